"""Whether the model is being traced for export.

While ``torch.export`` or ``torch.onnx.export`` traces the model, image sizes are symbols:
code that loops over data-sized chunks (the CPU memory savers) or builds tensors from sizes
would fix them to the example's values, so such code takes a plain path instead.
"""

from __future__ import annotations

import torch


def exporting() -> bool:
    """True while torch.export or torch.onnx.export traces the model."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
