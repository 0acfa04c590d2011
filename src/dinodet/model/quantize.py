"""int8 for CPU inference: the model's Linear layers dynamically quantised.

:func:`quantize_int8` replaces every ``nn.Linear`` of a model (dinodet's own
:class:`~dinodet.model.linear.Linear` included) by PyTorch's dynamically quantised linear
(``torch.ao.nn.quantized.dynamic.Linear``, what ``torch.ao.quantization.quantize_dynamic``
puts in): the weight is stored as int8, per output channel (symmetric, scale = max |w| /
127.5, as ``per_channel_dynamic_qconfig``), and every call quantises its input to 8 bits
with a scale taken from that input, multiplies in int8 and returns float32. The layers
inside ``nn.MultiheadAttention`` stay float: its forward reads ``out_proj.weight`` as a
tensor. Everything else (convolutions, norms, deformable attention) is unchanged.

Why not ``quantize_dynamic`` itself: it matches modules by exact type, so it skips
dinodet's ``Linear`` subclass, and ``Linear.from_float`` refuses subclasses too; so the
quantised modules are built here the way ``from_float`` builds them (a test checks that the
two agree on a plain ``nn.Linear``). In torch 2.14 ``torch.ao.quantization`` warns that it
is deprecated (for torchao), and creating quantised tensors warns likewise; the modules and
kernels used here still work, and the conversion silences those two warnings.

The result is CPU-only and for inference (no gradients); its detections are close to, not
equal to, the float model's: measure the AP change (``dinodet eval --int8``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from dinodet.errors import UserError

__all__ = ["ENGINES", "Int8Counts", "Int8Warning", "int8_counts", "quantize_int8"]

log = logging.getLogger(__name__)

# The quantised engines to pack the weights for, best first. On the 2-core AMD EPYC
# (AVX-512 VNNI) this project is measured on, r50-4scale at 800x1088, one thread, medians
# of 5 (benchmarks/bench_int8.py --engines x86 fbgemm onednn): float32 8.08 s, x86 6.37 s,
# fbgemm 6.34 s, onednn 6.57 s; x86 (fbgemm's kernels for these linears) and fbgemm tie.
# The engine only matters while the weights are packed (the packed weights carry their
# kernel), so it is set for the conversion only and restored after it.
ENGINES = ("x86", "fbgemm", "onednn")

# The messages of the deprecation warnings that torch 2.14 gives while converting.
_DEPRECATION_MESSAGES = (r"torch\.ao\.quantization is deprecated",
                         r"torch\.quantize_per_tensor, torch\.quantize_per_channel")


class Int8Warning(UserWarning):
    """int8 inference is approximate: its detections differ a little from float32's."""


@dataclass(frozen=True)
class Int8Counts:
    """The Linear layers of a model: ``int8`` dynamically quantised, ``float`` still
    float (those of ``nn.MultiheadAttention``, or all of a model never converted)."""

    int8: int
    float: int

    def describe(self) -> str:
        kept = f", {self.float} left float" if self.float else ""
        return f"{self.int8} Linear layers in int8{kept}"


def _dynamic_linear() -> type[nn.Module]:
    try:
        with _quiet():
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError as e:  # a future torch without torch.ao's quantised modules
        raise UserError(f"int8: torch {torch.__version__} has no dynamically quantised "
                        f"Linear (torch.ao.nn.quantized.dynamic: {e})") from None
    return DynamicLinear


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        yield


@contextlib.contextmanager
def _engine(engine: str | None) -> Iterator[str]:
    supported = torch.backends.quantized.supported_engines
    if engine is None:
        engine = next((e for e in ENGINES if e in supported), None)
        if engine is None:
            raise UserError(f"int8: this torch build has none of the quantised engines "
                            f"{', '.join(ENGINES)} (it has {', '.join(supported)})")
    elif engine not in supported:
        raise UserError(f"int8 engine {engine!r} is not in this torch build's "
                        f"{', '.join(supported)}")
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield engine
    finally:
        torch.backends.quantized.engine = saved


def _float_linears(model: nn.Module) -> tuple[list[tuple[str, nn.Linear]], set[int]]:
    """(name, layer) of every distinct nn.Linear, and the ids of those to leave float."""
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            keep.update(id(m) for m in module.modules() if isinstance(m, nn.Linear))
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():  # a shared layer is listed once
        if isinstance(module, nn.Linear) and id(module) not in seen:
            seen.add(id(module))
            found.append((name, module))
    return found, keep


def int8_counts(model: nn.Module) -> Int8Counts:
    """How many distinct Linear layers of ``model`` are int8 and how many float."""
    dynamic = _dynamic_linear()
    int8 = {id(m) for m in model.modules() if isinstance(m, dynamic)}
    floats, _ = _float_linears(model)
    return Int8Counts(len(int8), len(floats))


def _quantize_linear(layer: nn.Linear, dynamic: type[nn.Module]) -> nn.Module:
    weight = layer.weight.detach()
    # per_channel_dynamic_qconfig's weight observer: symmetric, zero point 0.
    amax = weight.abs().amax(dim=1)
    scale = (amax / 127.5).clamp_min(torch.finfo(torch.float32).eps)
    qweight = torch.quantize_per_channel(weight, scale.double(),
                                         torch.zeros(scale.shape, dtype=torch.int64), 0,
                                         torch.qint8)
    qlayer = dynamic(layer.in_features, layer.out_features, bias_=layer.bias is not None,
                     dtype=torch.qint8)
    bias = layer.bias.detach() if layer.bias is not None else None
    qlayer.set_weight_bias(qweight, bias)  # type: ignore[operator]
    return qlayer


def quantize_int8(model: nn.Module, *, inplace: bool = False,
                  engine: str | None = None) -> nn.Module:
    """``model`` (a copy of it unless ``inplace``) in eval mode with its Linear layers
    dynamically quantised to int8 (module docstring); layers shared between modules stay
    shared. The model must be float32 on the CPU. ``engine``: the quantised engine to pack
    for (default: the first of :data:`ENGINES` this torch has). Logs how many layers it
    converted; :func:`int8_counts` counts them. Use the model returned (for a bare
    ``nn.Linear`` it is a new module even with ``inplace``)."""
    dynamic = _dynamic_linear()
    found, keep = _float_linears(model)
    for name, layer in found:
        if id(layer) in keep:
            continue
        for pname, p in layer.named_parameters():
            if p.device.type != "cpu" or p.dtype != torch.float32:
                where = f"{name}.{pname}" if name else pname
                raise UserError(f"int8 needs a float32 model on the CPU; {where} is "
                                f"{str(p.dtype).removeprefix('torch.')} on {p.device}")
    if not inplace:
        model = copy.deepcopy(model)
        found, keep = _float_linears(model)
    with _quiet(), _engine(engine) as used:
        replaced = {id(layer): _quantize_linear(layer, dynamic)
                    for _, layer in found if id(layer) not in keep}
    for module in list(model.modules()):
        # _modules, not named_children(): that lists a child held twice only once.
        for child_name, child in list(module._modules.items()):
            if id(child) in replaced:
                setattr(module, child_name, replaced[id(child)])
    if id(model) in replaced:  # the model is one Linear: nothing holds it
        model = replaced[id(model)]
    model.eval()
    counts = Int8Counts(len(replaced), len(found) - len(replaced))
    log.info("int8 (%s engine): %s", used, counts.describe())
    return model
