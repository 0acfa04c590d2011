"""Export a detector for deployment: ONNX (onnxruntime, TensorRT, ...) or ``torch.export``.

Both hold :class:`ExportGraph`: float32 ``images`` [B, 3, H, W], RGB in [0, 1], resized
by the model's :class:`~dinodet.data.EvalTransform` (B, H, W dynamic unless
``dynamic=False``) -> ``boxes`` [B, K, 4] (xyxy pixels of the input, clipped), ``scores``
[B, K] (descending), ``labels`` [B, K] (int64), K = the model's ``num_select``; no
threshold. Normalisation and top-k are inside; the deformable attention is traced through
``grid_sample`` (ONNX GridSample), denoising is off, a batch shares one size. The class
table and the transform's metadata travel in the file (ONNX ``metadata_props`` key
``dinodet``, or the archive's ``dinodet.json``); :func:`read_metadata` reads either.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinodet.data.transforms import EvalTransform
from dinodet.model.postprocess import select_top

__all__ = ["EXPORT_FORMATS", "ExportGraph", "ExportedModel", "compare_detections",
           "export_model", "read_metadata", "run_exported"]

EXPORT_FORMATS = ("onnx", "torch-export")
METADATA_KEY = "dinodet"
DEFAULT_OPSET = 18
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]


class ExportGraph(nn.Module):
    """RGB [0, 1] images -> (boxes, scores, labels); see the module docstring."""

    def __init__(self, model: nn.Module, num_select: int | None = None,
                 transform: EvalTransform | None = None) -> None:
        super().__init__()
        transform = transform or EvalTransform()
        self.model = model.eval()
        cfg = getattr(model, "cfg", None)
        self.num_select = int(num_select or getattr(cfg, "num_select", None) or 300)
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(transform.mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(transform.std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, w = images.shape[-2:]
        out = self.model((images - self.mean) / self.std)
        # The size multiplies a tensor as symbols, so the traced graph reads it from the
        # input instead of fixing the example's.
        one = images.new_ones(())
        size = torch.stack([one * w, one * h, one * w, one * h])
        scores, labels, xyxy = select_top(out["pred_logits"], out["pred_boxes"], size,
                                          self.num_select)
        xyxy = torch.minimum(xyxy.clamp(min=0), size)
        return xyxy, scores, labels


def _metadata(classes: list[dict[str, Any]] | None, transform: EvalTransform,
              num_classes: int, variant: str | None) -> dict[str, Any]:
    return {"format_version": 1, "input": "float32 [B, 3, H, W] RGB in [0, 1]",
            "outputs": OUTPUT_NAMES, "classes": classes, "num_classes": num_classes,
            **transform.metadata(), "variant": variant}


def export_model(model: nn.Module, out: str | Path, fmt: str = "onnx", *,
                 example_size: tuple[int, int] = (800, 1088), batch_size: int = 1,
                 dynamic: bool = True, opset: int = DEFAULT_OPSET,
                 classes: list[dict[str, Any]] | None = None,
                 transform: EvalTransform | None = None, num_select: int | None = None,
                 variant: str | None = None) -> Path:
    """Trace ``model`` (a :class:`~dinodet.model.DINO`) and write it to ``out``.

    Args:
        fmt: "onnx" (an ``.onnx`` file, opset >= 17) or "torch-export" (a ``.pt2`` archive
            for ``torch.export.load``).
        example_size: (H, W) of the example traced; with ``dynamic`` any other size runs
            too, as long as the image yields at least ``num_queries`` encoder tokens.
        batch_size: the example's batch (at least 2 with ``dynamic``, which keeps B free).
        classes / transform: stored as metadata (see :func:`read_metadata`); the
            transform's mean and std normalise inside the graph, its sizes tell a runtime
            how to resize (:meth:`EvalTransform.from_metadata`).
    Returns:
        The path written. It is written atomically (into a temporary folder of a unique name
        beside it, then moved), and checked before any tracing
        (:func:`~dinodet.weights.check_output_file`); a failed export leaves nothing behind.
    """
    from dinodet.weights import check_output_file

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of "
                         f"{', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx" and opset < 17:
        raise ValueError(f"opset {opset} is too old: the graph needs opset >= 17")
    height, width = example_size
    if min(height, width) < 64 or batch_size < 1:
        raise ValueError(f"example batch {batch_size} of {height}x{width} is too small "
                         "(at least 1 image of 64x64)")
    out = check_output_file(out, "export file")
    transform = transform or EvalTransform()
    graph = ExportGraph(model, num_select, transform).eval()
    param = next(model.parameters())
    if dynamic:  # a size-1 example would fix B to 1 (tracing specialises sizes 0 and 1)
        batch_size = max(batch_size, 2)
    example = torch.rand(batch_size, 3, height, width, dtype=param.dtype, device=param.device)
    dims = None
    if dynamic:
        any_size = torch.export.Dim.DYNAMIC
        dims = {"images": {0: any_size, 2: any_size, 3: any_size}}
    cfg = getattr(model, "cfg", None)
    meta = _metadata(classes, transform, int(getattr(cfg, "num_classes", 0)), variant)
    with torch.no_grad():
        if fmt == "torch-export":
            program = torch.export.export(graph, (example,), dynamic_shapes=dims)

            def save(path: Path) -> None:
                with warnings.catch_warnings():  # weights shared by the layers' heads
                    warnings.filterwarnings("ignore", "No complete tensor found")
                    torch.export.save(program, path,
                                      extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})

            _write_beside(out, save)
        else:
            _export_onnx(graph, example, dims, opset, out, meta)
    return out


def _write_beside(out: Path, save: Callable[[Path], None]) -> None:
    """``save(path)`` into a fresh temporary folder beside ``out`` (a unique name, made by
    ``mkdtemp``), with ``out``'s own name, then every file it made moved next to ``out``:
    ``out`` itself last, each by ``os.replace``. The folder goes, whatever happens; a reader
    never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_folder(out) as folder:
        save(folder / out.name)
        made = sorted(folder.iterdir(), key=lambda f: f.name == out.name)
        if not made or made[-1].name != out.name:
            raise RuntimeError(f"the exporter wrote no {out.name}")
        for file in made:  # side files (ONNX external data) first, then the model
            os.replace(file, out.parent / file.name)


@contextlib.contextmanager
def _temporary_folder(out: Path) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _export_onnx(graph: ExportGraph, example: Tensor, dims: dict | None, opset: int,
                 out: Path, meta: dict[str, Any]) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({e.name} is "
                          "missing): pip install 'dinodet[export]'") from e
    program = torch.onnx.export(graph, (example,), input_names=INPUT_NAMES,
                                output_names=OUTPUT_NAMES, dynamic_shapes=dims,
                                opset_version=opset, dynamo=True, verbose=False)
    if program is None:  # pragma: no cover - the TorchScript exporter returns nothing
        raise RuntimeError("torch.onnx.export returned no program")
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    # Weights of a model over 2 GB go to a side file named after the model; writing under
    # out's own name in a temporary folder keeps that reference right once moved.
    _write_beside(out, lambda path: program.save(path))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_model` stored in an ``.onnx`` file or ``.pt2`` archive
    (read without loading the model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                return json.loads(prop.value)
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not exported by dinodet")
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist()
                     if n.endswith(f"/extra/{METADATA_KEY}.json")]
            if not names:
                raise ValueError(f"{path} has no {METADATA_KEY}.json: not exported by dinodet")
            return json.loads(archive.read(names[0]))
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is neither an .onnx file nor a torch.export archive") from e


class ExportedModel:
    """An exported file ready to run: onnxruntime for ``.onnx`` (``providers`` default to
    the CPU), ``torch.export.load`` for a ``.pt2`` archive. Calling it with [B, 3, H, W]
    RGB [0, 1] float32 images returns (boxes, scores, labels) tensors; ``metadata`` is
    :func:`read_metadata`'s."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.format = "onnx" if self.path.suffix == ".onnx" else "torch-export"
        if self.format == "onnx":
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise ImportError("running an ONNX file needs onnxruntime: "
                                  "pip install 'dinodet[export]'") from e
            self._session = ort.InferenceSession(
                str(self.path), providers=providers or ["CPUExecutionProvider"])
        else:
            self._module = torch.export.load(self.path).module()

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.format == "onnx":
            outs = self._session.run(OUTPUT_NAMES,
                                     {INPUT_NAMES[0]: images.float().cpu().numpy()})
            boxes, scores, labels = (torch.from_numpy(o) for o in outs)
            return boxes, scores, labels
        with torch.no_grad():
            return self._module(images)


def run_exported(path: str | Path, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Load an exported file and run it once; see :class:`ExportedModel`."""
    return ExportedModel(path)(images)


def compare_detections(expected: tuple[Tensor, Tensor, Tensor],
                       actual: tuple[Tensor, Tensor, Tensor], min_score: float = 0.0
                       ) -> dict[str, float]:
    """Largest score and box differences between two (boxes, scores, labels) results over
    the detections scoring at least ``min_score`` in ``expected``.

    Detections are paired by label and nearest score, so two near-equal scores that the
    runtimes order differently still pair up; an unpaired detection counts as infinite.
    """
    worst = {"score": 0.0, "box": 0.0}
    for e_boxes, e_scores, e_labels, a_boxes, a_scores, a_labels in zip(*expected, *actual):
        free = torch.ones(len(a_scores), dtype=torch.bool)
        for box, score, label in zip(e_boxes, e_scores, e_labels):
            if score < min_score:
                continue
            cost = (a_scores - score).abs().double()
            cost[(a_labels != label) | ~free] = float("inf")
            if not torch.isfinite(cost.min()):
                return {"score": float("inf"), "box": float("inf")}
            # among equally close scores, the closest box
            close = cost <= cost.min() + 1e-6
            box_err = (a_boxes - box).abs().amax(1).double()
            box_err[~close] = float("inf")
            j = int(box_err.argmin())
            if not torch.isfinite(box_err[j]):
                return {"score": float("inf"), "box": float("inf")}
            free[j] = False
            worst["score"] = max(worst["score"], float(cost[j]))
            worst["box"] = max(worst["box"], float(box_err[j]))
    return worst
