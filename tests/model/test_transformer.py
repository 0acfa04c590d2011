"""Deformable encoder and DINO decoder: shapes, padding, references, gradients, masks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dinodet.model.boxes import inverse_sigmoid
from dinodet.model.heads import MLP
from dinodet.model.transformer import FFN, Decoder, DecoderLayer, Encoder, EncoderLayer

DIM = 16
SHAPES = [(4, 4), (2, 2)]
S = sum(h * w for h, w in SHAPES)
LAYER = dict(ffn_dim=32, dropout=0.0, num_levels=2, num_heads=2, num_points=2)


def _encoder(num_layers: int = 2, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(num_layers, dim=DIM, **LAYER).eval()


def _decoder(num_layers: int = 3, look_forward_twice: bool = True, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(num_layers, DIM, look_forward_twice=look_forward_twice, **LAYER).eval()


def _box_head(seed: int = 1) -> MLP:
    torch.manual_seed(seed)
    head = MLP(DIM, DIM, 4, 3)  # default init: a non-zero delta, so references move
    with torch.no_grad():
        head.layers[-1].weight.mul_(0.1)
    return head


def _padding() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0 unpadded; image 1 with the right column and bottom row of level 0 and the
    right column of level 1 padded. Returns (mask [2, S], valid ratios [2, L, 2] (w, h))."""
    lvl0 = torch.zeros(2, 4, 4, dtype=torch.bool)
    lvl0[1, :, 3] = True
    lvl0[1, 3, :] = True
    lvl1 = torch.zeros(2, 2, 2, dtype=torch.bool)
    lvl1[1, :, 1] = True
    mask = torch.cat([lvl0.flatten(1), lvl1.flatten(1)], 1)
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.75, 0.75], [0.5, 1.0]]])
    return mask, ratios


def _decoder_inputs(b: int = 2, q: int = 5, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    tgt = torch.randn(b, q, DIM, generator=gen)
    anchors = torch.randn(b, q, 4, generator=gen) * 0.5
    anchors[..., 2:] -= 1.5  # smallish boxes
    memory = torch.randn(b, S, DIM, generator=gen)
    mask, ratios = _padding()
    return tgt, anchors, memory, mask[:b], ratios[:b]


# ----------------------------------------------------------------------------- encoder


def test_encoder_layer_and_encoder_shapes():
    enc = _encoder()
    assert len(enc.layers) == 2
    assert all(isinstance(layer, EncoderLayer) for layer in enc.layers)
    gen = torch.Generator().manual_seed(0)
    src, pos = torch.randn(2, S, DIM, generator=gen), torch.randn(2, S, DIM, generator=gen)
    mask, ratios = _padding()
    with torch.no_grad():
        out = enc(src, pos, SHAPES, ratios, mask)
        unmasked = enc(src, pos, SHAPES, ratios, None)
    assert out.shape == (2, S, DIM) and unmasked.shape == (2, S, DIM)
    assert torch.isfinite(out).all()
    # Post-norm: every token leaves the last FFN layer-normed (weights 1, bias 0 at init).
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, S), atol=1e-5, rtol=0)


def test_reference_points_hand_computed():
    shapes = [(2, 2), (1, 2)]
    ratios = torch.tensor([[[1.0, 1.0], [0.5, 1.0]]])  # level 1 is half padding in x
    ref = Encoder.reference_points(shapes, ratios)
    assert ref.shape == (1, 6, 2, 2)
    # Cell centres normalised by the valid size of their own level ...
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75],
                            [0.5, 0.5], [1.5, 0.5]])
    # ... then seen from each level: scaled by that level's valid ratio.
    torch.testing.assert_close(ref[0, :, 0], centres * torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(ref[0, :, 1], centres * torch.tensor([0.5, 1.0]))


def test_padding_does_not_reach_unpadded_encoder_outputs():
    """Padded values are zeroed in every layer's deformable attention, and every other op
    is per token: unpadded outputs cannot depend on what sits at padded positions."""
    enc = _encoder(num_layers=3)
    gen = torch.Generator().manual_seed(3)
    src, pos = torch.randn(2, S, DIM, generator=gen), torch.randn(2, S, DIM, generator=gen)
    mask, ratios = _padding()
    noisy_src, noisy_pos = src.clone(), pos.clone()
    noisy_src[mask] = torch.randn(int(mask.sum()), DIM, generator=gen) * 10
    noisy_pos[mask] = torch.randn(int(mask.sum()), DIM, generator=gen) * 10
    with torch.no_grad():
        out = enc(src, pos, SHAPES, ratios, mask)
        noisy = enc(noisy_src, noisy_pos, SHAPES, ratios, mask)
        unguarded = enc(src, pos, SHAPES, ratios, None)
        unguarded_noisy = enc(noisy_src, noisy_pos, SHAPES, ratios, None)
    keep = ~mask
    torch.testing.assert_close(noisy[keep], out[keep], atol=1e-6, rtol=0)
    # Image 0 has no padding at all: untouched.
    torch.testing.assert_close(noisy[0], out[0], atol=1e-6, rtol=0)
    # The padded tokens themselves do change, and without the mask so do the others.
    assert not torch.allclose(noisy[mask], out[mask], atol=1e-3)
    assert not torch.allclose(unguarded_noisy[1][keep[1]], unguarded[1][keep[1]], atol=1e-3)


def test_encoder_is_deterministic_given_a_seed():
    gen = torch.Generator().manual_seed(4)
    src, pos = torch.randn(1, S, DIM, generator=gen), torch.randn(1, S, DIM, generator=gen)
    ratios = torch.ones(1, 2, 2)
    a, b, c = _encoder(seed=7), _encoder(seed=7), _encoder(seed=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with torch.no_grad():
        out_a = a(src, pos, SHAPES, ratios, None)
        torch.testing.assert_close(out_a, a(src, pos, SHAPES, ratios, None), rtol=0, atol=0)
        torch.testing.assert_close(out_a, b(src, pos, SHAPES, ratios, None), rtol=0, atol=0)
        assert not torch.allclose(out_a, c(src, pos, SHAPES, ratios, None))


def test_encoder_gradients_reach_every_layer():
    enc = _encoder()
    gen = torch.Generator().manual_seed(5)
    src = torch.randn(1, S, DIM, generator=gen, requires_grad=True)
    pos = torch.randn(1, S, DIM, generator=gen)
    enc(src, pos, SHAPES, torch.ones(1, 2, 2), None).pow(2).sum().backward()
    assert src.grad is not None and src.grad.abs().sum() > 0
    for layer in enc.layers:
        for name in ("value_proj", "output_proj", "sampling_offsets"):
            grad = getattr(layer.self_attn, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_ffn_chunking_matches_one_block(monkeypatch):
    torch.manual_seed(0)
    ffn = FFN(DIM, 32, 0.0)
    x = torch.randn(2, 37, DIM)
    whole = ffn._block(x)
    monkeypatch.setattr(FFN, "CPU_CHUNK_ELEMENTS", 32 * 5)  # 5 rows per chunk
    torch.testing.assert_close(ffn(x), whole)


def test_exported_ffn_keeps_its_norm_apart_and_fuses_its_relu(tmp_path):
    # onnxruntime's CPU SkipLayerNormalization (its fusion of an Add and a LayerNormalization)
    # is several times slower than the two ops; a Gemm with its ReLU is one FusedGemm.
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    ffn = FFN(DIM, 32, 0.0).eval()
    x = torch.randn(2, 7, DIM)
    path, optimised = tmp_path / "ffn.onnx", tmp_path / "ffn.opt.onnx"
    program = torch.onnx.export(ffn, (x,), dynamo=True, verbose=False,
                                dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC,
                                                      1: torch.export.Dim.DYNAMIC}})
    program.save(str(path))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimised)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(optimised)).graph.node]
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    assert "FusedGemm" in ops and "Relu" not in ops
    other = torch.randn(3, 11, DIM)  # another batch and length
    (out,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), ffn(other), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- decoder


def test_decoder_shapes_and_reference_count():
    dec = _decoder(num_layers=3)
    assert all(isinstance(layer, DecoderLayer) for layer in dec.layers)
    tgt, anchors, memory, mask, ratios = _decoder_inputs()
    with torch.no_grad():
        hidden, refs = dec(tgt, anchors, memory, SHAPES, ratios, mask, None, _box_head())
    assert len(hidden) == 3
    assert len(refs) == 4
    assert all(h.shape == (2, 5, DIM) for h in hidden)
    assert all(r.shape == (2, 5, 4) for r in refs)
    torch.testing.assert_close(refs[0], anchors.sigmoid())
    for r in refs:
        assert ((r > 0) & (r < 1)).all()
    # The box head moves the references: each layer refines the previous box.
    for a, b in itertools.pairwise(refs):
        assert not torch.allclose(a, b)
    # The hidden states are the decoder norm's output.
    for h in hidden:
        torch.testing.assert_close(h.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)


class _ConstantDelta(nn.Module):
    """A box head whose logit delta is the same for every query."""

    def __init__(self, delta: list[float]) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.tensor(delta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :4] * 0 + self.delta


def test_references_add_the_box_head_delta_in_logit_space():
    dec = _decoder(num_layers=3)
    tgt, anchors, memory, mask, ratios = _decoder_inputs()
    delta = [0.2, -0.1, 0.3, 0.05]
    with torch.no_grad():
        _, refs = dec(tgt, anchors, memory, SHAPES, ratios, mask, None, _ConstantDelta(delta))
    for i, r in enumerate(refs):
        torch.testing.assert_close(r, (anchors + i * torch.tensor(delta)).sigmoid(),
                                   atol=1e-5, rtol=0)


def test_references_stay_inside_the_unit_interval_for_extreme_anchors():
    dec = _decoder(num_layers=2)
    tgt, anchors, memory, mask, ratios = _decoder_inputs()
    anchors = anchors * 0 + torch.tensor([-6.0, 6.0, -6.0, 5.0])
    with torch.no_grad():
        _, refs = dec(tgt, anchors, memory, SHAPES, ratios, mask, None, _box_head())
    for r in refs:
        assert ((r > 0) & (r < 1)).all()


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_controls_gradient_through_references(look_forward_twice):
    dec = _decoder(num_layers=2, look_forward_twice=look_forward_twice)
    head = _box_head()
    tgt, anchors, memory, mask, ratios = _decoder_inputs()
    hidden, refs = dec(tgt, anchors, memory, SHAPES, ratios, mask, None, head)
    assert not refs[0].requires_grad
    assert all(r.requires_grad == look_forward_twice for r in refs[1:])
    # Layer 1's box loss as DINO forms it: its own head on hidden[1], refining refs[1].
    own_head = _box_head(seed=9)
    pred = (own_head(hidden[1]) + inverse_sigmoid(refs[1])).sigmoid()
    pred.sum().backward()
    # Both ways, layer 1's loss trains layer 0 through the content path (tgt).
    assert dec.layers[0].ffn.linear2.weight.grad is not None
    assert all(g is not None for g in _grads(own_head))
    if look_forward_twice:
        # refs[1] is layer 0's refined box, still attached: the shared box head that made
        # it gets a gradient from layer 1's loss.
        grads = _grads(head)
        assert all(g is not None for g in grads)
        assert grads[-1].abs().sum() > 0
    else:
        assert all(g is None for g in _grads(head))


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_layer_inputs_are_detached_references(look_forward_twice):
    """The boxes fed to the next layer's attention are detached either way: the hidden
    states never pass gradient back into the box head."""
    dec = _decoder(num_layers=2, look_forward_twice=look_forward_twice)
    head = _box_head()
    tgt, anchors, memory, mask, ratios = _decoder_inputs()
    hidden, _ = dec(tgt, anchors, memory, SHAPES, ratios, mask, None, head)
    hidden[-1].pow(2).sum().backward()
    assert all(g is None for g in _grads(head))
    assert dec.ref_point_head.layers[0].weight.grad is not None
    assert dec.layers[1].cross_attn.sampling_offsets.weight.grad is not None


def test_self_attention_mask_blocks_masked_queries():
    dec = _decoder(num_layers=3)
    head = _box_head()
    tgt, anchors, memory, mask, ratios = _decoder_inputs(q=4)
    # Two groups {0, 1} and {2, 3}; True = may not attend (as in denoising groups).
    group = torch.tensor([0, 0, 1, 1])
    attn_mask = group[:, None] != group[None, :]
    tgt2, anchors2 = tgt.clone(), anchors.clone()
    gen = torch.Generator().manual_seed(11)
    tgt2[:, 2:] += torch.randn(2, 2, DIM, generator=gen) * 3
    anchors2[:, 2:] += 0.5
    with torch.no_grad():
        h1, r1 = dec(tgt, anchors, memory, SHAPES, ratios, mask, attn_mask, head)
        h2, r2 = dec(tgt2, anchors2, memory, SHAPES, ratios, mask, attn_mask, head)
        h3, _ = dec(tgt, anchors, memory, SHAPES, ratios, mask, None, head)
        h4, _ = dec(tgt2, anchors2, memory, SHAPES, ratios, mask, None, head)
    for a, b in zip(h1, h2):
        torch.testing.assert_close(a[:, :2], b[:, :2], atol=1e-5, rtol=0)
        assert not torch.allclose(a[:, 2:], b[:, 2:], atol=1e-3)
    for a, b in zip(r1, r2):
        torch.testing.assert_close(a[:, :2], b[:, :2], atol=1e-5, rtol=0)
    # Without the mask the change reaches queries 0 and 1.
    assert not torch.allclose(h3[-1][:, :2], h4[-1][:, :2], atol=1e-3)


def test_memory_padding_is_ignored_by_the_decoder():
    dec = _decoder(num_layers=2)
    head = _box_head()
    tgt, anchors, memory, mask, ratios = _decoder_inputs()
    noisy = memory.clone()
    noisy[mask] = torch.randn(int(mask.sum()), DIM) * 10
    with torch.no_grad():
        h1, r1 = dec(tgt, anchors, memory, SHAPES, ratios, mask, None, head)
        h2, r2 = dec(tgt, anchors, noisy, SHAPES, ratios, mask, None, head)
        h3, _ = dec(tgt, anchors, noisy, SHAPES, ratios, None, None, head)
    for a, b in zip(h1 + r1, h2 + r2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(h1[-1][1], h3[-1][1], atol=1e-3)


def test_decoder_is_deterministic_given_a_seed():
    tgt, anchors, memory, mask, ratios = _decoder_inputs()
    outs = []
    for seed in (3, 3, 4):
        dec, head = _decoder(seed=seed), _box_head()
        with torch.no_grad():
            outs.append(dec(tgt, anchors, memory, SHAPES, ratios, mask, None, head))
    for a, b in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(outs[0][0][-1], outs[2][0][-1])
