"""int8 for CPU inference: the model's Linear layers and convolutions in int8.

:func:`quantize_int8` replaces every ``nn.Linear`` of a model (dinodet's own
:class:`~dinodet.model.linear.Linear` included) by PyTorch's dynamically quantised linear
(``torch.ao.nn.quantized.dynamic.Linear``, what ``torch.ao.quantization.quantize_dynamic``
puts in): the weight is stored as int8, per output channel (symmetric, scale = max |w| /
127.5, as ``per_channel_dynamic_qconfig``), and every call quantises its input to 8 bits
with a scale taken from that input, multiplies in int8 and returns float32. The layers
inside ``nn.MultiheadAttention`` stay float: its forward reads ``out_proj.weight`` as a
tensor. Norms, the deformable attention's sampling and the rest stay float32.

Why not ``quantize_dynamic`` itself: it matches modules by exact type, so it skips
dinodet's ``Linear`` subclass, and ``Linear.from_float`` refuses subclasses too; so the
quantised modules are built here the way ``from_float`` builds them (a test checks that the
two agree on a plain ``nn.Linear``). In torch 2.14 ``torch.ao.quantization`` warns that it
is deprecated (for torchao), and creating quantised tensors warns likewise; the modules and
kernels used here still work, and the conversion silences those two warnings.

Convolutions (``convs=True``, the default) become :class:`Int8Conv2d`: int8 weights per
output channel, and an input quantised on every call to unsigned 8 bits with the scale and
zero point of that input's own range (as the dynamic Linear does), run by oneDNN's int8
convolution (``torch.ops.onednn.qconv2d_pointwise``, the kernel PyTorch's x86 int8 backend
uses) with a float32 output. PyTorch's own dynamically quantised ``Conv2d`` is not used:
in torch 2.14 it returns wrong values for non-negative inputs (about 70 % relative error
after a ReLU, as every backbone convolution but the first gets). On CPUs without VNNI the
weights get 7 bits (at most 63 in magnitude): their 8-bit products are summed in pairs into
16-bit registers there, and 255 x 127 x 2 overflows them.

The result is CPU-only and for inference (no gradients); its detections are close to, not
equal to, the float model's: measure the AP change (``dinodet eval --int8``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from dinodet.errors import UserError

__all__ = ["ENGINES", "Int8Conv2d", "Int8Counts", "Int8Warning", "int8_counts", "quantize_int8"]

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


# How many input shapes an Int8Conv2d keeps its weight packed for (a few images' sizes).
_PACKED_SHAPES = 8


class Int8Warning(UserWarning):
    """int8 inference is approximate: its detections differ a little from float32's."""


@dataclass(frozen=True)
class Int8Counts:
    """The Linear layers of a model: ``int8`` dynamically quantised, ``float`` still
    float (those of ``nn.MultiheadAttention``, or all of a model never converted); and
    ``convs``, its :class:`Int8Conv2d` layers."""

    int8: int
    float: int
    convs: int = 0

    def describe(self) -> str:
        kept = f", {self.float} left float" if self.float else ""
        convs = f" and {self.convs} convolutions" if self.convs else ""
        return f"{self.int8} Linear layers{convs} in int8{kept}"


@functools.cache
def _has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 VNNI, AVX-VNNI or AMX): 8-bit products summed
    in 32 bits, without the 16-bit intermediate of older x86 CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:  # not Linux: assume the older instructions, whose 7-bit weights are safe
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def safe_weight_bits() -> int:
    """The convolution weight width whose products this CPU sums without overflow: 8 with
    VNNI, 7 without."""
    return 8 if _has_vnni() else 7


def _int8_convolution_available() -> bool:
    try:
        torch.ops.onednn.qconv_prepack  # noqa: B018 - looked up to see if it exists
        torch.ops.onednn.qconv2d_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def _quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """``x`` (N, C, H, W) as uint8 in channels-last layout (oneDNN's fast one), with the
    scale and zero point of its own range, zero included (as
    ``torch.quantize_per_tensor_dynamic`` chooses them). Done on the NHWC view: torch's
    quantiser is about 10x slower on a channels-last NCHW tensor than on the same memory
    seen as a contiguous NHWC one."""
    nhwc = x.float().permute(0, 2, 3, 1).contiguous()  # a view if already channels-last
    lo, hi = (float(v) for v in torch.aminmax(nhwc))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zero_point = min(255, max(0, round(-lo / scale)))
    q = torch.quantize_per_tensor(nhwc, scale, zero_point, torch.quint8).int_repr()
    return q.permute(0, 3, 1, 2), scale, zero_point


class Int8Conv2d(nn.Module):
    """A float ``nn.Conv2d`` run in int8 (module docstring): ``weight_bits`` per output
    channel, symmetric (None: 8 on CPUs with VNNI, 7 on the others); the input quantised
    per call to uint8 with the range of that input (zero included); the output float32, in
    channels-last memory format. Inference only, on the CPU. 8 bits on a CPU without VNNI
    warns: their products overflow there (about 10 % relative error)."""

    def __init__(self, conv: nn.Conv2d, weight_bits: int | None = None,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        if not self.can_run(conv):
            raise ValueError(f"Int8Conv2d: padding {conv.padding!r} / padding_mode "
                             f"{conv.padding_mode!r}: only numeric zero padding")
        safe_bits = safe_weight_bits()
        if weight_bits is None:
            weight_bits = safe_bits
        elif weight_bits not in (7, 8):
            raise ValueError(f"Int8Conv2d: weight_bits must be 7 or 8, got {weight_bits!r}")
        elif weight_bits > safe_bits:
            warnings.warn("Int8Conv2d: weight_bits=8 on a CPU without VNNI, whose 16-bit "
                          "sums of 8-bit products overflow (about 10 % error); "
                          "weight_bits=7 (the default here) does not", stacklevel=2)
        from dinodet.model.backbone import fold_batchnorm

        with torch.no_grad():
            bias: torch.Tensor | None
            if norm is not None:  # the BatchNorm that follows, folded in
                weight, bias = fold_batchnorm(conv, norm)
            else:
                weight, bias = conv.weight, conv.bias
            weight = weight.detach().float()
            bias = bias.detach().float() if bias is not None else None
        qmax = 2 ** (weight_bits - 1) - 1
        amax = weight.flatten(1).abs().amax(1)
        scale = (amax / qmax).clamp_min(torch.finfo(torch.float32).eps)
        qweight = (weight / scale.view(-1, 1, 1, 1)).round().clamp(-qmax, qmax).to(torch.int8)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding = list(_pair(conv.stride)), list(_pair(conv.padding))
        self.dilation, self.groups = list(_pair(conv.dilation)), conv.groups
        self.weight_bits = weight_bits
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(len(scale), dtype=torch.int64))
        self.register_buffer("bias", bias)
        self.register_buffer("qweight", qweight)
        self.folded_norm = norm is not None
        # The weight in oneDNN's layout for an input shape: packed without the shape,
        # oneDNN reorders it on every call (ResNet-50's last 1x1 convolutions ran 15-20x
        # slower so). Packed per input shape, the last few kept; no buffer (not savable).
        self._packed: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    @staticmethod
    def can_run(conv: nn.Conv2d) -> bool:
        """Whether ``conv``'s padding is one this class runs: numeric and zero."""
        return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def packed_weight(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The weight packed by oneDNN for inputs of ``shape`` (cached)."""
        packed = self._packed.get(shape)
        if packed is None:
            packed = torch.ops.onednn.qconv_prepack(
                self.qweight, self.weight_scale, 1.0, 0, self.stride, self.padding,
                self.dilation, self.groups, list(shape))
            self._packed[shape] = packed
            while len(self._packed) > _PACKED_SHAPES:
                self._packed.popitem(last=False)
        else:
            self._packed.move_to_end(shape)
        return packed

    def forward(self, x: torch.Tensor, relu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``x`` (float, N, C, H, W), then ``+ residual`` and a ReLU
        if asked, in the same oneDNN call. ``residual`` (float32, the output's shape) is
        written over: the result is computed in its memory."""
        if x.dim() != 4:
            raise ValueError(f"Int8Conv2d: input of shape {tuple(x.shape)}, need N, C, H, W")
        qx, x_scale, x_zero_point = _quantize_input(x)
        args = (qx, x_scale, x_zero_point, self.packed_weight(tuple(qx.shape)),
                self.weight_scale, self.weight_zero_point)
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        if residual is None:
            return torch.ops.onednn.qconv2d_pointwise(
                *args, self.bias, *geometry, 1.0, 0, torch.float32,
                "relu" if relu else "none", [], "")
        return torch.ops.onednn.qconv2d_pointwise.binary(
            *args, residual, self.bias, *geometry, 1.0, 0, torch.float32, 1.0, 0, "sum",
            1.0, "relu" if relu else "none", [], "")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, "
                f"groups={self.groups}, weight_bits={self.weight_bits}"
                f"{', norm folded' if self.folded_norm else ''}")


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
    convs = {id(m) for m in model.modules() if isinstance(m, Int8Conv2d)}
    return Int8Counts(len(int8), len(floats), len(convs))


def _is_foldable_norm(module: nn.Module) -> bool:
    """A BatchNorm whose running statistics an eval-mode forward applies: FrozenBatchNorm2d,
    or nn.BatchNorm2d with running statistics (the model is put in eval mode)."""
    from torchvision.ops import FrozenBatchNorm2d

    if type(module) is FrozenBatchNorm2d:
        return True
    return (type(module) is nn.BatchNorm2d and module.affine
            and module.running_mean is not None and module.running_var is not None)


def _channels(norm: nn.Module) -> int:
    weight = getattr(norm, "weight", None)  # a buffer of FrozenBatchNorm2d
    return weight.numel() if isinstance(weight, torch.Tensor) else -1


def _conv_norm_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, norm name) of every convolution whose output goes straight into
    a foldable BatchNorm: consecutive children of an nn.Sequential (ResNet's downsample),
    and ``convN`` / ``bnN`` of torchvision's ResNet blocks and dinodet's ResNet body, whose
    forwards apply each ``bnN`` to ``convN``'s output."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from dinodet.model.backbone import ResNetBody

    pairs = []
    for parent in model.modules():
        children = parent._modules
        if isinstance(parent, nn.Sequential):
            names = list(children)
            candidates = list(itertools.pairwise(names))
        elif isinstance(parent, (BasicBlock, Bottleneck, ResNetBody)):
            candidates = [(n, "bn" + n[4:]) for n in children if n.startswith("conv")]
        else:
            continue
        for conv_name, norm_name in candidates:
            conv, norm = children.get(conv_name), children.get(norm_name)
            if (type(conv) is nn.Conv2d and norm is not None and _is_foldable_norm(norm)
                    and _channels(norm) == conv.out_channels):
                pairs.append((parent, conv_name, norm_name))
    return pairs


def _shared_modules(model: nn.Module) -> set[int]:
    """The ids of the modules held in more than one place of ``model``."""
    seen: set[int] = set()
    shared: set[int] = set()
    for module in model.modules():
        for child in module._modules.values():
            if child is not None:
                (shared if id(child) in seen else seen).add(id(child))
    return shared


def _float_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(name, layer) of every distinct nn.Conv2d that :class:`Int8Conv2d` can run."""
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and id(module) not in seen and Int8Conv2d.can_run(module):
            seen.add(id(module))
            found.append((name, module))
    return found


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
                  engine: str | None = None, convs: bool = True) -> nn.Module:
    """``model`` (a copy of it unless ``inplace``) in eval mode with its Linear layers
    dynamically quantised to int8 and, with ``convs``, its convolutions run in int8 by
    :class:`Int8Conv2d` (module docstring); layers shared between modules stay shared.
    The model must be float32 on the CPU. ``engine``: the quantised engine to pack the
    Linear weights for (default: the first of :data:`ENGINES` this torch has). Logs how
    many layers it converted; :func:`int8_counts` counts them. Use the model returned (for
    a bare ``nn.Linear`` it is a new module even with ``inplace``)."""
    dynamic = _dynamic_linear()
    found, keep = _float_linears(model)
    conv_layers = _float_convs(model) if convs else []
    checked = [(n, m) for n, m in found if id(m) not in keep] + conv_layers
    for name, layer in checked:
        for pname, p in layer.named_parameters():
            if p.device.type != "cpu" or p.dtype != torch.float32:
                where = f"{name}.{pname}" if name else pname
                raise UserError(f"int8 needs a float32 model on the CPU; {where} is "
                                f"{str(p.dtype).removeprefix('torch.')} on {p.device}")
    if conv_layers and not _int8_convolution_available():
        log.warning("int8: this torch build has no oneDNN int8 convolution; the "
                    "convolutions stay float32")
        conv_layers = []
    if not inplace:
        model = copy.deepcopy(model)
        found, keep = _float_linears(model)
        conv_layers = _float_convs(model) if conv_layers else []
    with _quiet(), _engine(engine) as used:
        replaced = {id(layer): _quantize_linear(layer, dynamic)
                    for _, layer in found if id(layer) not in keep}
    replaced_convs: dict[int, nn.Module] = {}
    if conv_layers:
        shared = _shared_modules(model)
        convertible = {id(layer) for _, layer in conv_layers}
        for parent, conv_name, norm_name in _conv_norm_pairs(model):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            if id(conv) not in convertible or id(conv) in shared or id(norm) in shared:
                continue  # folding a shared norm or conv would change its other users
            replaced_convs[id(conv)] = Int8Conv2d(conv, norm=norm)
            setattr(parent, norm_name, nn.Identity())
        for _, layer in conv_layers:
            if id(layer) not in replaced_convs:
                replaced_convs[id(layer)] = Int8Conv2d(layer)
    replaced.update(replaced_convs)
    for module in list(model.modules()):
        # _modules, not named_children(): that lists a child held twice only once.
        for child_name, child in list(module._modules.items()):
            if id(child) in replaced:
                setattr(module, child_name, replaced[id(child)])
    if id(model) in replaced:  # the model is one layer: nothing holds it
        model = replaced[id(model)]
    model.eval()  # also what the folded BatchNorms' running statistics assume
    linears = len(replaced) - len(replaced_convs)
    counts = Int8Counts(linears, len(found) - linears, len(replaced_convs))
    log.info("int8 (%s engine; %d-bit convolution weights): %s", used, safe_weight_bits(),
             counts.describe())
    return model
