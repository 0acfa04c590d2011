"""Small shared prediction heads."""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


def class_head(dim: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    """Linear classifier with the focal-loss prior bias −log((1−p)/p)."""
    head = nn.Linear(dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
    return head


def box_head(dim: int) -> MLP:
    """3-layer box MLP predicting a (cx, cy, w, h) logit delta; starts at zero delta."""
    head = MLP(dim, dim, 4, 3)
    last = head.layers[-1]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return head
