"""``nn.Linear`` whose float32 CPU products run on oneDNN where that is faster.

PyTorch's CPU ``addmm`` calls MKL's sgemm, which on AMD processors with AVX-512 takes its
AVX2 code path: on the 2-core AMD EPYCs (AVX-512) this project was measured on, it reached
about 120 GFLOP/s where oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, what
PyTorch's own inductor emits for CPU linears) reached about 240 (2026-12-01), and 180
against 209 on a Zen 4 (2026-12-04), for the encoder's [tokens, 256] x [256, 2048]
products. On a CPU with AVX2 only, both run AVX2 kernels and oneDNN has no edge: on a Zen
3 EPYC (2026-12-06) MKL was as fast or faster by shape, and DINO's inference 5-8 % faster
on MKL (training alike). A DINO spends over half of its CPU inference in these products.

:class:`Linear` is an ``nn.Linear`` (same parameters, state-dict keys, ``isinstance``):
on float32 CPU tensors, when oneDNN is built in and :data:`ENABLED`, its forward and
backward run as oneDNN products through a small autograd function; anything else (CUDA,
other dtypes, tracing for export, ``torch.compile``, an AVX2-only CPU by default) is
``F.linear``. Results equal ``F.linear``'s up to float32 rounding (the sums run in another
order). ``DINODET_ONEDNN_LINEAR``: ``0`` turns it off, ``1`` on whatever the CPU, unset
(``auto``) on unless PyTorch's CPU capability is ``AVX2``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinodet.model.tracing import exporting

ENV_VAR = "DINODET_ONEDNN_LINEAR"


# oneDNN's matmul is in this torch build: the products can run there.
AVAILABLE = bool(torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _enabled(setting: str | None, capability: str) -> bool:
    """Whether :class:`Linear` uses oneDNN, from ``DINODET_ONEDNN_LINEAR``'s value (None:
    unset) and ``torch.backends.cpu.get_cpu_capability()``."""
    value = (setting or "auto").strip().lower()
    if not AVAILABLE or value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return capability != "AVX2"  # auto: AVX-512 (and anything not measured) keeps oneDNN


# Read once, at import; tests and benchmarks may set it.
ENABLED = _enabled(os.environ.get(ENV_VAR), torch.backends.cpu.get_cpu_capability())


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Tensor:
    """x [T, in] @ weight [out, in]ᵀ (+ bias, then ReLU if ``relu``) by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none",
                                              [], "")


class _OneDNNLinear(torch.autograd.Function):
    """[T, in] rows -> [T, out] (a fresh tensor: in-place ops on it are fine)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                relu: bool) -> Tensor:
        return _mm(x, weight, bias, relu)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, relu = inputs
        # ReLU's backward reads the output (> 0 where it passed).
        ctx.save_for_backward(x, weight, output if relu else None)
        ctx.has_bias, ctx.relu = bias is not None, relu

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, output = ctx.saved_tensors
        if ctx.relu:
            grad = torch.ops.aten.threshold_backward(grad, output, 0)
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(grad, weight.t(), None)
        if ctx.needs_input_grad[1]:
            # gradᵀ x, computed so that oneDNN writes the wider of the two dimensions
            # innermost (the other order is 2-3x slower on the encoder's shapes).
            out_features, in_features = weight.shape
            if in_features > out_features:
                grad_w = _mm(grad.t(), x.t(), None)
            else:
                grad_w = _mm(x.t(), grad.t(), None).t().contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


def _fast(x: Tensor, weight: Tensor) -> bool:
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.numel() > 0 and not exporting()
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting()
            and not torch.jit.is_tracing())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False
           ) -> Tensor:
    """``F.linear(x, weight, bias)`` (then ReLU if ``relu``), by oneDNN for float32 CPU
    tensors (see the module docstring), with the ReLU fused there."""
    if exporting() and x.dim() > 2:
        # On rows, the product exports as one Gemm with its bias instead of a MatMul and a
        # separate Add over its whole output; onnxruntime fuses a ReLU straight after it.
        out = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
        if relu:
            out = out.relu()
        return out.view(*x.shape[:-1], weight.shape[0])
    if not _fast(x, weight):
        out = F.linear(x, weight, bias)
        return out.relu_() if relu else out
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out = _OneDNNLinear.apply(rows, weight, bias, relu)
    else:
        out = _mm(rows, weight, bias, relu)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (oneDNN for float32 on the CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def linear_relu(layer: nn.Module, x: Tensor) -> Tensor:
    """``relu(layer(x))``, fused into one oneDNN product when ``layer`` is a float32
    :class:`Linear` on the CPU; any other module (a quantised one, say) runs as itself."""
    if type(layer) is Linear:
        return linear(x, layer.weight, layer.bias, relu=True)
    if _is_dynamic_int8(layer):  # fbgemm's product with the ReLU fused, same values
        # reduce_range=True: what the module's own forward passes for int8 weights.
        packed = layer._packed_params._packed_params  # type: ignore[union-attr]
        return torch.ops.quantized.linear_relu_dynamic(x, packed, True)
    return torch.relu(layer(x))


def _is_dynamic_int8(layer: nn.Module) -> bool:
    """A ``torch.ao.nn.quantized.dynamic.Linear`` with int8 weights (checked by name, so
    that float models never import torch.ao's deprecated quantisation package)."""
    cls = type(layer)
    return (cls.__name__ == "Linear"
            and cls.__module__.startswith("torch.ao.nn.quantized.dynamic")
            and getattr(getattr(layer, "_packed_params", None), "dtype", None) == torch.qint8)
