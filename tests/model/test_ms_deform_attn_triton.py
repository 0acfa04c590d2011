"""The Triton deformable-attention op against the PyTorch path: forward and the three
gradients, odd shapes, points off the maps, low precision, the custom op's registrations,
backend selection, and torch.compile without graph breaks.

On CPU the kernels run under Triton's interpreter, in this process: the op decorates its
kernels for the interpreter itself when the tensors are on the CPU (no TRITON_INTERPRET
needed). Shapes are small because the interpreter is slow. With a GPU the same tests also
run compiled on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dinodet.model.ms_deform_attn as msda
from dinodet.model import ms_deform_attn_triton as mst
from dinodet.model.ms_deform_attn import MSDeformAttn, ms_deform_attn

# Everything but test_imports_without_triton runs the kernels or forces the backend.
requires_triton = pytest.mark.skipif(not mst.AVAILABLE, reason="triton is not installed")
F64 = torch.float64
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
SHAPES = [(3, 5), (2, 7), (1, 1), (4, 2), (5, 3)]  # non-square, a 1×1 level, tall and wide


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Modules built in a test default to "auto" whatever the caller's environment."""
    monkeypatch.delenv(msda.ENV_VAR, raising=False)


def make_inputs(levels, heads, points, d, *, n=2, lq=5, seed=0, kinks=False):
    """float64 inputs (value, shapes, locations, weights) on the CPU.

    Sampling points sit 0.1 to 0.9 pixel off the lines through pixel centres, where
    bilinear sampling has kinks (float32 and float64 may round to either side and the
    gradients jump), inside or up to two pixels around each map. The first query also
    samples the image borders, far-away and infinite points and, with ``kinks``, pixel
    centres exactly. The last three values of each batch are zero, like padding.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = SHAPES[:levels]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, heads, d, generator=g, dtype=F64)
    value[:, -3:] = 0
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=F64)  # [L, 2]
    cells = torch.randint(-2, 7, (n, lq, heads, levels, points, 2), generator=g).to(F64)
    frac = 0.1 + 0.8 * torch.rand(n, lq, heads, levels, points, 2, generator=g, dtype=F64)
    loc = (cells + frac + 0.5) / sizes[:, None]
    special = [
        torch.zeros(levels, 2),  # top-left border, half a pixel outside the first centre
        torch.ones(levels, 2),  # bottom-right border
        torch.tensor([0.0, 1.0]).expand(levels, 2),
        torch.full((levels, 2), -5.0),
        torch.full((levels, 2), 1e30),
        torch.tensor([float("-inf"), 0.5]).expand(levels, 2),
    ]
    if kinks:
        special += [0.5 / sizes, (sizes - 0.5) / sizes, (sizes // 2 + 0.5) / sizes]
    k = 0
    for head in range(heads):
        for p in range(points if lq else 0):
            loc[0, 0, head, :, p] = special[k % len(special)]
            k += 1
    w = torch.rand(n, lq, heads, levels, points, generator=g, dtype=F64)
    w = w / w.sum((-1, -2), keepdim=True)
    return value, shapes, loc, w


def output_and_grads(fn, inputs, shapes, grad_out):
    """fn's output and the gradients of (output · grad_out).sum() for value, locations and
    weights."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    out.backward(grad_out.to(out.dtype))
    return out.detach(), *(t.grad for t in leaves)


def reference(inputs, shapes, grad_out):
    """The PyTorch path in float64 on the CPU, of the inputs as given (rounded)."""
    inputs = [t.detach().cpu().double() for t in inputs]
    return output_and_grads(ms_deform_attn, inputs, shapes, grad_out.cpu().double())


CONFIGS = [(1, 1, 1, 4), (3, 3, 2, 24), (5, 2, 3, 7), (2, 4, 2, 32)]  # (L, M, P, D)


@requires_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("levels", "heads", "points", "d"), CONFIGS)
def test_float32_matches_pure_path(device, levels, heads, points, d):
    value, shapes, loc, w = make_inputs(levels, heads, points, d, seed=levels)
    inputs = [t.float().to(device) for t in (value, loc, w)]
    grad_out = torch.randn(2, 5, heads * d, generator=torch.Generator().manual_seed(1))
    got = output_and_grads(mst.ms_deform_attn_triton, inputs, shapes, grad_out.to(device))
    want = reference(inputs, shapes, grad_out)
    assert got[0].shape == (2, 5, heads * d) and got[0].dtype == torch.float32
    for name, a, b in zip(("output", "value", "locations", "weights"), got, want):
        assert a.dtype == torch.float32 and a.device.type == device, name
        scale = b.abs().max().item()
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-6 * scale, msg=name)
    # Far-away and infinite points neither read nor pass gradients.
    assert got[2][0, 0].isfinite().all()


@requires_triton
@pytest.mark.parametrize("device", DEVICES)
def test_forward_on_pixel_centres_and_nan(device):
    value, shapes, loc, w = make_inputs(3, 3, 3, 5, kinks=True)
    loc[1, 2, 1, 0, 0, 0] = float("nan")
    inputs = [t.float().to(device) for t in (value, loc, w)]
    got = mst.ms_deform_attn_triton(inputs[0], shapes, *inputs[1:]).cpu().double()
    want = ms_deform_attn(
        *[t.cpu().double() for t in inputs[:1]], shapes, *[t.cpu().double() for t in inputs[1:]]
    )
    # NaN in, NaN out (as grid_sample) for that (query, head) only.
    assert got.isnan().equal(want.isnan()) and got.isnan().sum() == 5
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-6)


@requires_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device, dtype):
    value, shapes, loc, w = make_inputs(3, 3, 2, 12, seed=5)
    inputs = [t.to(device, dtype) for t in (value, loc, w)]
    grad_out = torch.randn(2, 5, 36, generator=torch.Generator().manual_seed(2))
    got = output_and_grads(mst.ms_deform_attn_triton, inputs, shapes, grad_out.to(device))
    want = reference(inputs, shapes, grad_out.to(dtype))
    for name, a, b in zip(("output", "value", "locations", "weights"), got, want):
        assert a.dtype == dtype, name
        a = a.cpu().double()
        assert (a - b).norm() <= 1e-2 * b.norm(), name
    # float32 locations and weights with half values, as MSDeformAttn passes them.
    mixed = [inputs[0], inputs[1].float(), inputs[2].float()]
    got = output_and_grads(mst.ms_deform_attn_triton, mixed, shapes, grad_out.to(device))
    assert [t.dtype for t in got] == [dtype, dtype, torch.float32, torch.float32]
    assert (got[0].cpu().double() - want[0]).norm() <= 1e-2 * want[0].norm()


@requires_triton
def test_64_bit_indices_and_strided_inputs(monkeypatch):
    value, shapes, loc, w = make_inputs(2, 3, 2, 6, seed=7)
    inputs = [t.float() for t in (value, loc, w)]
    grad_out = torch.randn(2, 5, 18, generator=torch.Generator().manual_seed(3))
    want = output_and_grads(mst.ms_deform_attn_triton, inputs, shapes, grad_out)
    monkeypatch.setattr(mst, "_INDEX_32_LIMIT", 0)
    strided = [inputs[0].transpose(0, 1).contiguous().transpose(0, 1), *inputs[1:]]
    assert not strided[0].is_contiguous()
    got = output_and_grads(mst.ms_deform_attn_triton, strided, shapes, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@requires_triton
def test_empty_and_invalid_inputs():
    value, shapes, loc, w = make_inputs(2, 2, 2, 4, lq=0)
    value, loc, w = value.float(), loc.float(), w.float()
    assert mst.ms_deform_attn_triton(value, shapes, loc, w).shape == (2, 0, 8)
    with pytest.raises(TypeError, match="float64"):
        mst.ms_deform_attn_triton(value.double(), shapes, loc, w)
    with pytest.raises(ValueError, match="do not add up"):
        mst.ms_deform_attn_triton(value, [(3, 5), (2, 6)], loc, w)
    with pytest.raises(ValueError, match="levels"):
        mst.ms_deform_attn_triton(value, [(3, 5)], loc, w)


@requires_triton
def test_opcheck():
    value, shapes, loc, w = make_inputs(2, 2, 2, 3, n=1, lq=3)
    value, loc, w = value.float(), loc.float(), w.float()
    flat = [x for hw in shapes for x in hw]
    torch.library.opcheck(
        torch.ops.dinodet.ms_deform_attn.default,
        (value.requires_grad_(), flat, loc.requires_grad_(), w.requires_grad_()),
    )
    grad_out = torch.randn(1, 3, 6)
    torch.library.opcheck(
        torch.ops.dinodet.ms_deform_attn_backward.default,
        (grad_out, value.detach(), flat, loc.detach(), w.detach()),
    )


def fake_cuda_values(dtype=torch.float32):
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    with mode:
        return torch.empty(1, 6, 2, 4, device="cuda", dtype=dtype)


@pytest.fixture
def nondeterministic():
    """Deterministic algorithms off for the test (a training test earlier in the session
    may have switched them on for the process, as training does), restored after."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@requires_triton
def test_backend_selection(monkeypatch, nondeterministic):
    cpu = torch.zeros(1, 6, 2, 4)
    cuda = fake_cuda_values()
    assert msda.resolve_backend(None) == "auto" and MSDeformAttn(8, 1, 2, 1).backend == "auto"
    assert not msda.uses_triton(cpu, "auto") and msda.uses_triton(cuda, "auto")
    assert not msda.uses_triton(cuda.double(), "auto")  # float64 stays exact
    torch.use_deterministic_algorithms(True)  # restored by the fixture
    # atomics in the kernels' backward: deterministic runs keep the PyTorch path
    assert not msda.uses_triton(cuda, "auto")
    torch.use_deterministic_algorithms(False)
    assert not msda.uses_triton(cuda, "torch")
    assert msda.uses_triton(cpu, "triton") and msda.uses_triton(cuda.half(), "triton")
    assert not msda.uses_triton(cpu.double(), "triton")
    assert not msda.uses_triton(cuda, ms_deform_attn)  # a callable replaces both paths
    # The environment variable is the default when a module is built; an explicit backend
    # overrides it.
    monkeypatch.setenv(msda.ENV_VAR, "triton")
    attn = MSDeformAttn(8, 1, 2, 1)
    assert attn.backend == "triton" and msda.uses_triton(cpu, attn.backend)
    assert MSDeformAttn(8, 1, 2, 1, backend="torch").backend == "torch"
    assert MSDeformAttn(8, 1, 2, 1, backend="auto").backend == "auto"
    monkeypatch.setenv(msda.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=rf"unknown.*'cuda'.*{msda.ENV_VAR}"):
        MSDeformAttn(8, 1, 2, 1)
    assert attn.backend == "triton"  # built modules do not read it again
    monkeypatch.delenv(msda.ENV_VAR)
    with pytest.raises(ValueError, match=r"unknown.*'fast'.*'auto', 'triton', 'torch'"):
        MSDeformAttn(8, 1, 2, 1, backend="fast")
    with pytest.raises(ValueError, match=r"unknown.*'fast'"):
        attn.backend = "fast"
    assert attn.backend == "triton"  # unchanged by the failed assignment
    monkeypatch.setattr(mst, "AVAILABLE", False)
    assert not msda.uses_triton(cuda, "auto")  # auto without triton: the PyTorch path
    with pytest.raises(RuntimeError, match="needs triton installed"):
        MSDeformAttn(8, 1, 2, 1, backend="triton")
    with pytest.raises(RuntimeError, match="needs triton installed"):
        attn.backend = "triton"


def random_module(dim=18, levels=3, heads=3, points=2, seed=0):
    torch.manual_seed(seed)
    attn = MSDeformAttn(dim, levels, heads, points)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def module_inputs(ref_dim, dim=18, device="cpu", seed=3):
    shapes = [(3, 4), (2, 5), (1, 3)]
    s = sum(h * w for h, w in shapes)
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(2, 7, dim, generator=g)
    value = torch.randn(2, s, dim, generator=g)
    ref = torch.rand(2, 7, 3, ref_dim, generator=g)
    mask = torch.rand(2, s, generator=g) < 0.3
    return [t.to(device) for t in (query, ref, value)], shapes, mask.to(device)


def module_output_and_grads(attn, inputs, shapes, mask):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    attn.zero_grad()
    out = attn(*leaves, shapes, mask)
    out.square().sum().backward()
    return [out.detach(), *(t.grad for t in leaves), *(p.grad for p in attn.parameters())]


@requires_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_uses_op_and_matches(device, ref_dim, monkeypatch):
    attn = random_module().to(device)
    inputs, shapes, mask = module_inputs(ref_dim, device=device)
    calls = []
    op = mst.ms_deform_attn_triton
    monkeypatch.setattr(mst, "ms_deform_attn_triton", lambda *a: calls.append(1) or op(*a))
    attn.backend = "torch"
    want = module_output_and_grads(attn, inputs, shapes, mask)
    assert not calls
    attn.backend = "triton"
    got = module_output_and_grads(attn, inputs, shapes, mask)
    assert calls
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    # auto: the op on CUDA only.
    calls.clear()
    attn.backend = "auto"
    module_output_and_grads(attn, inputs, shapes, mask)
    assert bool(calls) == (device == "cuda")


@requires_triton
def test_module_bfloat16_and_export_branch(monkeypatch):
    attn = random_module()
    inputs, shapes, mask = module_inputs(4)
    with torch.no_grad():
        want = attn(*inputs, shapes, mask)
        attn16 = random_module().to(torch.bfloat16)
        attn16.backend = "triton"
        got = attn16(*(t.to(torch.bfloat16) for t in inputs), shapes, mask)
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).norm() < 3e-2 * want.norm()
        # Exporting takes the one-gather sampling whatever the backend.
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        monkeypatch.setattr(mst, "ms_deform_attn_triton", None)  # would raise if called
        for backend in ("triton", lambda *a: None):  # the callable would fail if called
            attn.backend = backend
            torch.testing.assert_close(attn(*inputs, shapes, mask), want, rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    attn = random_module().to(device)
    inputs, shapes, mask = module_inputs(2, device=device)
    attn.backend = "triton"
    want = module_output_and_grads(attn, inputs, shapes, mask)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attn, fullgraph=True, backend=counter)
    got = module_output_and_grads(compiled, inputs, shapes, mask)
    assert counter.frame_count == 1
    assert "dinodet.ms_deform_attn" in counter.graphs[0].code
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    torch._dynamo.reset()


def test_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, dinodet.model.ms_deform_attn as m\n"
        "assert not m.ms_deform_attn_triton.AVAILABLE and m.resolve_backend(None) == 'auto'\n"
        "attn = m.MSDeformAttn(8, 1, 2, 1)\n"
        "assert attn.backend == 'auto'\n"
        "attn(torch.randn(1, 3, 8), torch.rand(1, 3, 1, 2), torch.randn(1, 6, 8), [(2, 3)])\n"
        "import os\n"
        "for backend, env in (('triton', None), (None, 'triton')):\n"
        "    if env:\n"
        f"        os.environ['{msda.ENV_VAR}'] = env\n"
        "    try:\n"
        "        m.MSDeformAttn(8, 1, 2, 1, backend=backend)\n"
        "    except RuntimeError as e:\n"
        "        assert 'needs triton installed' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != msda.ENV_VAR}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
