"""dinodet.model.linear: oneDNN products equal F.linear, forward and backward."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinodet.model import linear as lin
from dinodet.model.linear import Linear, linear, linear_relu

needs_onednn = pytest.mark.skipif(not lin.AVAILABLE, reason="PyTorch built without oneDNN")


@pytest.fixture(autouse=True)
def _onednn_on(monkeypatch):
    """The oneDNN path under test, whether or not this CPU uses it by default (AVX2-only
    CPUs do not)."""
    monkeypatch.setattr(lin, "ENABLED", lin.AVAILABLE)


def _grads(fn, x, w, b):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(g)
    return out.detach(), x.grad, w.grad, b.grad


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (3, 1, 4, 16)])
@pytest.mark.parametrize(("in_f", "out_f"), [(16, 40), (16, 8), (16, 16)])
@pytest.mark.parametrize("relu", [False, True])
def test_forward_and_backward_equal_f_linear(shape, in_f, out_f, relu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape[:-1], in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g)

    def ref(x, w, b):
        out = F.linear(x, w, b)
        return out.relu() if relu else out

    expected = _grads(ref, x, w, b)
    actual = _grads(lambda x, w, b: linear(x, w, b, relu=relu), x, w, b)
    for e, a in zip(expected, actual):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_onednn_path_runs_and_gives_a_fresh_tensor():
    # The op really is oneDNN's (not F.linear's addmm), and its output takes in-place ops
    # under autograd.
    layer = Linear(16, 8)
    x = torch.randn(2, 3, 16, requires_grad=True)
    with torch.profiler.profile() as prof:
        out = layer(x)
    names = {e.key for e in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in names and "aten::addmm" not in names
    out.relu_().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_non_contiguous_input_and_no_grad():
    layer = Linear(16, 8)
    x = torch.randn(16, 10).t()  # [10, 16], column-major
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)
    sliced = torch.randn(2, 9, 16)[:, ::2]
    torch.testing.assert_close(layer(sliced), F.linear(sliced, layer.weight, layer.bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_run_f_linear_exactly(dtype):
    layer = Linear(16, 8).to(dtype)
    x = torch.randn(4, 16, dtype=dtype)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert torch.equal(linear_relu(layer, x), F.linear(x, layer.weight, layer.bias).relu())


def test_linear_relu_runs_any_module_as_itself():
    layer = nn.Linear(16, 8)  # not dinodet's Linear: a plain module is called
    x = torch.randn(4, 16)
    assert torch.equal(linear_relu(layer, x), layer(x).relu())


def test_state_dict_and_isinstance_are_nn_linear():
    layer = Linear(4, 3)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(nn.Linear(4, 3).state_dict())


def test_environment_variable_turns_it_off():
    code = "from dinodet.model import linear; print(linear.ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"DINODET_ONEDNN_LINEAR": "0", "PATH": ""}, check=True)
    assert out.stdout.strip() == "False"


@needs_onednn
def test_auto_keeps_onednn_off_on_avx2_only_cpus():
    assert lin._enabled(None, "AVX512") and lin._enabled("auto", "DEFAULT")
    assert not lin._enabled(None, "AVX2") and not lin._enabled(" Auto ", "AVX2")
    assert lin._enabled("1", "AVX2") and lin._enabled("on", "AVX2")
    assert not lin._enabled("off", "AVX512") and not lin._enabled("0", "AVX2")
    # What a process without the variable chooses at import, on this CPU.
    env = {k: v for k, v in os.environ.items() if k != lin.ENV_VAR}
    code = "from dinodet.model import linear; print(linear.ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == str(torch.backends.cpu.get_cpu_capability() != "AVX2")
