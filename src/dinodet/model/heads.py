"""Small shared prediction heads."""

from __future__ import annotations

import math

from torch import Tensor, nn

from dinodet.model.linear import Linear


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


def prior_bias(prior_prob: float = 0.01) -> float:
    """The focal-loss prior bias −log((1−p)/p) (−4.595 for p = 0.01)."""
    return -math.log((1 - prior_prob) / prior_prob)


def init_class_head(head: nn.Linear, prior_prob: float = 0.01) -> None:
    """PyTorch's default Linear weight, bias at the focal-loss prior :func:`prior_bias`."""
    head.reset_parameters()
    nn.init.constant_(head.bias, prior_bias(prior_prob))


def init_box_head(head: MLP) -> None:
    """PyTorch's default Linear init, except the last layer: zero weight and bias, so that
    the head starts with a zero box delta."""
    for layer in head.layers:
        assert isinstance(layer, nn.Linear)
        layer.reset_parameters()
    last = head.layers[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def class_head(dim: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    """Linear classifier initialised by :func:`init_class_head`."""
    head = Linear(dim, num_classes)
    init_class_head(head, prior_prob)
    return head


def box_head(dim: int) -> MLP:
    """3-layer box MLP predicting a (cx, cy, w, h) logit delta, initialised by
    :func:`init_box_head` (it starts at zero delta)."""
    head = MLP(dim, dim, 4, 3)
    init_box_head(head)
    return head
