"""Models on the Hugging Face Hub: load a model directory from a repo, publish one to it.

A Hub repo holding a model directory of :func:`~dinodet.weights.save_pretrained`
(``config.json``, ``model.safetensors``, the model card ``README.md``) opens wherever a
model path goes: ``load_pretrained("owner/name")``, ``Detector.from_pretrained(...)``,
``dinodet predict owner/name images/``, ``eval``, ``export``, ``serve``, ``--init``.

Which strings are Hub repos (:func:`hub_reference`):

* ``"hf://owner/name"``, ``"hf://owner/name@revision"``: always the Hub.
* a :class:`pathlib.Path`: always a local path.
* a string naming something on disk: that local file or folder (a folder ``owner/name``
  in the working directory wins over the repo of that name; ``hf://`` reaches the repo).
* any other string of the form ``owner/name`` or ``owner/name@revision`` (letters,
  digits, ``-``, ``_``, ``.``; not starting with ``.`` or ``-``; not ending in a file suffix
  such as ``.pt`` or ``.safetensors``): the Hub.
* anything else: a local path (a missing one is the usual "not found" error).

``revision`` (a branch, tag or commit; default ``main``) is given as ``@revision`` or as
the ``revision=`` argument. Only ``config.json`` and ``model.safetensors`` are downloaded,
never a pickle (``.bin``, ``.pt``, ``.pth``: unpickling runs code): ``config.json`` first,
checked as a local one is before the weights come, then ``model.safetensors`` of the same
commit. Both go into huggingface_hub's own cache (``HF_HUB_CACHE`` or ``HF_HOME`` move it;
progress bars on stderr); a cached model opens without the network, and with
``HF_HUB_OFFLINE=1`` nothing is asked of it. A model that is neither cached nor
downloadable is a :class:`HubModelUnavailableError` saying how to get it (the CLI exits
with status 2).

Publishing: :func:`model_card` is the ``README.md`` that ``save_pretrained`` writes
(model-card YAML front matter, then the model, image sizes, metrics and class table);
:func:`push_to_hub` (``dinodet push MODEL_DIR owner/name``) uploads a model directory.
Downloads and uploads need ``pip install 'dinodet[hub]'``.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinodet.errors import UserError
from dinodet.weights import (
    CheckpointError,
    CheckpointNotFoundError,
    LoadedModel,
    ModelMeta,
    load_model,
    read_model_meta,
    save_pretrained,
)

if TYPE_CHECKING:
    from dinodet.model.dino import DINO

__all__ = ["HUB_PREFIX", "METRICS_KEY", "MODEL_FILES", "HubModelUnavailableError",
           "HubReference", "check_license", "check_metrics", "download_model",
           "hub_reference", "is_generated_card", "model_card", "push_to_hub"]

#: The prefix that makes a string a Hub repo whatever is on disk.
HUB_PREFIX = "hf://"
#: What a Hub model repo must hold, in download order; nothing else is downloaded.
MODEL_FILES = ("config.json", "model.safetensors")
#: The entry of a model directory's config.json holding its metrics (name -> number).
METRICS_KEY = "metrics"
# What push_to_hub uploads of a model directory (a stray pickle stays home).
_UPLOADED = (*MODEL_FILES, "README.md")

_REPO_ID = re.compile(r"^(?![.-])[\w.-]{1,96}/(?![.-])[\w.-]{1,96}$", re.ASCII)
_REVISION = re.compile(r"^[\w.][\w./-]*$", re.ASCII)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A name ending so is a file someone means, not a repo (``models/best.pt`` stays local).
_FILE_SUFFIXES = (*_PICKLE_SUFFIXES, ".safetensors", ".json", ".onnx", ".pt2", ".yaml",
                  ".yml", ".jpg", ".jpeg", ".png")
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_CARD_MARK = "<!-- dinodet model card: written from config.json; an edited card is kept -->"


class HubModelUnavailableError(CheckpointError):
    """A Hub model that is not cached and cannot be downloaded (offline, no network); the
    message names the repo and how to get it."""


@dataclass(frozen=True)
class HubReference:
    """A model repo on the Hugging Face Hub: ``repo_id`` ("owner/name") and ``revision``
    (a branch, tag or commit; None: ``main``); ``explicit`` when given as ``hf://``."""

    repo_id: str
    revision: str | None = None
    explicit: bool = False

    def describe(self) -> str:
        """e.g. ``Hugging Face Hub repo owner/name@v1``."""
        at = f"@{self.revision}" if self.revision else ""
        return f"Hugging Face Hub repo {self.repo_id}{at}"


def _refuse_hf_path(text: str) -> UserError:
    body = text[len(HUB_PREFIX):].partition("@")[0]
    pickle = body.lower().endswith(_PICKLE_SUFFIXES)
    return UserError(
        f"{text}: {HUB_PREFIX} takes a model repo, {HUB_PREFIX}OWNER/NAME or "
        f"{HUB_PREFIX}OWNER/NAME@REVISION, whose config.json and model.safetensors are "
        "downloaded" + ("; a pickled file (.bin, .pt, .pth) is never downloaded: unpickling "
                        "runs code" if pickle else ""))


def hub_reference(source: Any, revision: str | None = None) -> HubReference | None:
    """The Hub repo that ``source`` names, or None for a local path, by the rules of the
    module docstring. ``revision`` (or ``@revision`` in ``source``) is checked; both given
    and different is a :class:`~dinodet.errors.UserError`, as is an ``hf://`` string that
    is not ``hf://owner/name[@revision]``."""
    if revision is not None and not (isinstance(revision, str) and _REVISION.match(revision)):
        raise UserError(f"revision must be a branch, tag or commit name, got {revision!r}")
    if not isinstance(source, str):
        return None  # a Path (or a state dict) is never a repo id
    explicit = source.startswith(HUB_PREFIX)
    if not explicit and os.path.lexists(source):
        return None
    repo, at, rev = source[len(HUB_PREFIX) if explicit else 0:].partition("@")
    if (not _REPO_ID.match(repo) or (at and not _REVISION.match(rev))
            or (not explicit and repo.lower().endswith(_FILE_SUFFIXES))):
        if explicit:
            raise _refuse_hf_path(source)
        return None
    if rev and revision is not None and rev != revision:
        raise UserError(f"{source} names revision {rev!r}, and revision={revision!r} another: "
                        "give one")
    return HubReference(repo, rev or revision, explicit)


def _hub_module(ref: HubReference | None = None) -> Any:
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError:
        if ref is not None and not ref.explicit:  # most likely a mistyped local path
            raise CheckpointNotFoundError(
                f"{ref.repo_id}: no such local file or folder; as a Hugging Face Hub repo id "
                "it needs the huggingface_hub package: pip install 'dinodet[hub]'") from None
        raise CheckpointError(
            "models from the Hugging Face Hub need the huggingface_hub package: pip install "
            "'dinodet[hub]' (or download the model directory and give its path)") from None


def _kinds(e: BaseException) -> set[str]:
    """The class names of ``e``'s type and its bases: huggingface_hub's error classes
    moved between modules over its versions, their names did not."""
    return {c.__name__ for c in type(e).__mro__}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _offline(hub: Any) -> bool:
    constants = getattr(hub, "constants", None) or importlib.import_module(
        "huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _repo_cache(hub: Any, repo_id: str) -> Path:
    constants = getattr(hub, "constants", None) or importlib.import_module(
        "huggingface_hub.constants")
    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def _cached_pickles(hub: Any, repo_id: str) -> list[str]:
    """The pickled weights files in the cached snapshots of ``repo_id`` (to say why they
    are not used)."""
    snapshots = _repo_cache(hub, repo_id) / "snapshots"
    if not snapshots.is_dir():
        return []
    return sorted({p.name for p in snapshots.glob("*/*")
                   if p.name.lower().endswith(_PICKLE_SUFFIXES)})


def _remote_pickles(hub: Any, ref: HubReference, revision: str | None,
                    token: str | bool | None) -> list[str]:
    """The pickled weights files of the repo on the Hub; [] when they cannot be listed."""
    try:
        files = hub.HfApi().list_repo_files(ref.repo_id, revision=revision, token=token)
    except Exception:  # only a better message is at stake
        return []
    return sorted(f for f in files if f.lower().endswith(_PICKLE_SUFFIXES))


def _pickles_note(pickles: list[str]) -> str:
    if not pickles:
        return ""
    return (f"; it holds {', '.join(pickles[:5])}: pickled weights, which dinodet never "
            "downloads (unpickling runs code). Open them with dinodet.load_model (a local "
            "run checkpoint or original .pth, read weights-only) and publish the model with "
            "save_pretrained / `dinodet push`, which write model.safetensors")


def _how_to_get(ref: HubReference) -> str:
    files = " ".join(MODEL_FILES)
    rev = f" --revision {ref.revision}" if ref.revision else ""
    return (f"Run once with network access (unset HF_HUB_OFFLINE; the files are cached for "
            f"later offline use), or on a machine with network: `hf download {ref.repo_id} "
            f"{files}{rev}` (`huggingface-cli download` with older huggingface_hub) and copy "
            f"its cache (HF_HUB_CACHE), or add `--local-dir DIR` and give DIR as the model "
            "path")


def _download_error(hub: Any, ref: HubReference, filename: str, e: Exception,
                    revision: str | None, token: str | bool | None) -> CheckpointError:
    """``e`` of ``hf_hub_download(ref, filename)`` as the error a user reads."""
    kinds = _kinds(e)
    where = ref.describe()
    local = ("" if ref.explicit else
             f"; there is no local file or folder {ref.repo_id!r} either")
    if kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        why = ("HF_HUB_OFFLINE is set" if _offline(hub) else
               f"the Hub cannot be reached ({_first_line(e)})")
        pickles = _pickles_note(_cached_pickles(hub, ref.repo_id))
        return HubModelUnavailableError(
            f"{where}: {filename} is not in huggingface_hub's cache "
            f"({_repo_cache(hub, ref.repo_id)}) and cannot be downloaded: {why}{local}"
            f"{pickles}. {_how_to_get(ref)}")
    if "GatedRepoError" in kinds:
        return CheckpointError(
            f"{where} is gated: accept its conditions at https://huggingface.co/"
            f"{ref.repo_id} and log in (`hf auth login`, or set HF_TOKEN)")
    if "RepositoryNotFoundError" in kinds:
        return CheckpointError(
            f"{where} was not found on the Hub (a private repo needs a login: `hf auth "
            f"login`, or set HF_TOKEN){local}")
    if "RevisionNotFoundError" in kinds:
        return CheckpointError(f"{where}: the repo has no revision {ref.revision!r}")
    if "EntryNotFoundError" in kinds:
        pickles = _pickles_note(_remote_pickles(hub, ref, revision, token))
        return CheckpointError(
            f"{where} is not a dinodet model repo: it has no {filename} (a dinodet model "
            f"repo holds {' and '.join(MODEL_FILES)}, as save_pretrained and `dinodet push` "
            f"write them){pickles}")
    return CheckpointError(f"{where}: cannot download {filename} ({_first_line(e)})")


def download_model(source: HubReference | str, revision: str | None = None,
                   token: str | bool | None = None) -> Path:
    """The folder of huggingface_hub's cache holding ``config.json`` and
    ``model.safetensors`` of a Hub model repo (``source``: a :class:`HubReference`, or a
    repo id as :func:`hub_reference` reads it), downloaded when not cached; nothing else of
    the repo is fetched. ``config.json`` is checked
    (:func:`~dinodet.weights.read_model_meta`) before the weights are downloaded, and the
    weights come from the commit the config came from. ``token``: for a private repo
    (default: the login of ``hf auth login`` / ``HF_TOKEN``)."""
    from dinodet import __version__

    ref = (source if isinstance(source, HubReference)
           else hub_reference(source if source.startswith(HUB_PREFIX) else HUB_PREFIX + source,
                              revision))
    assert ref is not None  # an hf:// string is a reference or an error
    hub = _hub_module(ref)

    def fetch(filename: str, rev: str | None) -> Path:
        try:
            return Path(hub.hf_hub_download(ref.repo_id, filename, revision=rev, token=token,
                                            library_name="dinodet",
                                            library_version=__version__))
        except Exception as e:
            raise _download_error(hub, ref, filename, e, rev, token) from e

    config_file = fetch(MODEL_FILES[0], ref.revision)
    read_model_meta(config_file)  # a config dinodet cannot use fails before the weights
    snapshot = config_file.parent  # snapshots/<commit>/config.json
    commit = snapshot.name if _COMMIT.match(snapshot.name) else ref.revision
    weights_file = fetch(MODEL_FILES[1], commit)
    if weights_file.parent != snapshot:  # another commit: never mix config and weights
        raise CheckpointError(f"{ref.describe()}: config.json and model.safetensors came "
                              f"from different commits ({snapshot} and "
                              f"{weights_file.parent}); try again")
    return snapshot


# --- the model card ---------------------------------------------------------------------

def check_metrics(metrics: Any, where: str) -> dict[str, float] | None:
    """None, or ``metrics`` as ``{name: float}``: names non-empty strings, values finite
    numbers; else a :class:`~dinodet.errors.UserError` naming ``where`` and the entry."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise UserError(f"{where} must be a mapping of metric name to number (e.g. "
                        f"{{'AP': 0.49}}), got {type(metrics).__name__}")
    found: dict[str, float] = {}
    for name, value in metrics.items():
        if not (isinstance(name, str) and name.strip()):
            raise UserError(f"{where}: a metric name must be a non-empty string, got {name!r}")
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)):
            raise UserError(f"{where}[{name!r}] must be a finite number, got {value!r}")
        found[name] = float(value)
    return found


def check_license(license: Any, where: str) -> str | None:
    """None, or a Hub license id (lower case, e.g. ``apache-2.0``, ``mit``, ``other``)."""
    if license is None:
        return None
    if not (isinstance(license, str) and _LICENSE.match(license)):
        raise UserError(f"{where} must be a Hugging Face license id such as 'apache-2.0', "
                        f"'mit' or 'other', got {license!r}")
    return license


def _cell(value: Any) -> str:
    """``value`` as one Markdown table cell (a class name may hold ``|`` or a newline)."""
    return " ".join(str(value).split()).replace("|", "\\|") or " "


def _number(value: float) -> str:
    return f"{value:.4g}"


def model_card(meta: ModelMeta, repo_id: str | None = None) -> str:
    """The Hugging Face model card (``README.md``) of a model directory's checked
    ``config.json``: YAML front matter (``library_name: dinodet``, the
    ``object-detection`` and ``dino`` tags, ``pipeline_tag: object-detection``, the
    license when known), then how to use it (with ``repo_id``, else a placeholder), the
    model (preset or variant when recorded, backbone, sizes), the image sizes it is
    evaluated at, its metrics, and the class table with the per-class score thresholds
    when there are any. Everything comes from ``meta``: the card of a directory is the
    same whoever writes it."""
    raw, cfg, transform = meta.raw, meta.config, meta.transform
    license = check_license(raw.get("license"), "config.json license")
    metrics = check_metrics(raw.get(METRICS_KEY), f"config.json {METRICS_KEY}")
    front = ["---", "library_name: dinodet", "tags:", "- object-detection", "- dino",
             "pipeline_tag: object-detection"]
    if license:
        front.append(f"license: {license}")
    front.append("---")
    preset = raw.get("variant") or raw.get("preset")
    title = f"DINO object detector ({_cell(preset)})" if preset else "DINO object detector"
    repo = repo_id or "OWNER/NAME"
    lines = [*front, _CARD_MARK, "", f"# {title}", "",
             "A [DINO](https://arxiv.org/abs/2203.03605) object detector (DETR with improved "
             "denoising anchor boxes) for [dinodet](https://pypi.org/project/dinodet/): "
             "safetensors weights and a JSON config, no pickle.", "",
             "## Use", "", "```python", "from dinodet import Detector", "",
             f'detector = Detector.from_pretrained("{repo}")  # pip install "dinodet[hub]"',
             'found = detector("image.jpg", threshold=0.3)',
             "print(found.boxes, found.names)", "```", "",
             f"or `dinodet predict {repo} images/ --out results/`.", "",
             "## Model", "", "| | |", "|---|---|"]
    rows = [("preset / variant", preset or "not recorded"),
            ("backbone", cfg.backbone.name),
            ("feature levels", cfg.num_feature_levels),
            ("hidden size", cfg.hidden_dim),
            ("encoder / decoder layers", f"{cfg.enc_layers} / {cfg.dec_layers}"),
            ("queries", cfg.num_queries),
            ("classes", cfg.num_classes)]
    if isinstance(raw.get("source"), str) and raw["source"]:  # the file, not where it lay
        rows.append(("converted from", Path(raw["source"]).name))
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    longer = (f", the longer side at most {transform.max_size} px" if transform.max_size
              else "")
    lines += ["", "## Image sizes", "",
              f"Images are resized so that the shorter side is {transform.size} px{longer} "
              "(as the model was evaluated; `eval_size` / `max_size` of "
              "`Detector.from_pretrained` change it), then normalised with mean "
              f"{', '.join(_number(v) for v in transform.mean)} and std "
              f"{', '.join(_number(v) for v in transform.std)}.", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|",
                  *(f"| {_cell(k)} | {_number(v)} |" for k, v in metrics.items()), ""]
    lines += _class_table(meta)
    return "\n".join(lines).rstrip("\n") + "\n"


def is_generated_card(card: Path, meta: ModelMeta, repo_id: str | None = None) -> bool:
    """Whether ``card`` is missing or is :func:`model_card` of ``meta`` as dinodet wrote
    it (with no repo id, or ``repo_id``): such a card may be rewritten, an edited one is
    kept."""
    if not card.is_file():
        return True
    text = card.read_text(encoding="utf-8", errors="replace")
    return text == model_card(meta) or (repo_id is not None
                                        and text == model_card(meta, repo_id))


def _class_table(meta: ModelMeta) -> list[str]:
    thresholds = meta.class_thresholds or {}
    lines = ["## Classes", ""]
    if thresholds:
        lines += ["The score threshold is what a detection of the class needs with "
                  '`threshold="auto"` (a class without one keeps no detection).', ""]
    labels = sorted({c["label"] for c in meta.classes or []} | set(thresholds))
    if not meta.classes:
        lines += [f"No class table: class index i is category id i, of "
                  f"{meta.config.num_classes} (the original DINO checkpoints use COCO's "
                  "category ids).", ""]
        if not thresholds:
            return lines
    by_label = {c["label"]: c for c in meta.classes or []}
    header = "| label | category id | name |" + (" score threshold |" if thresholds else "")
    lines += [header, "|---|---|---|" + ("---|" if thresholds else "")]
    for label in labels:
        entry = by_label.get(label, {})
        row = (f"| {label} | {_cell(entry.get('category_id', label))} | "
               f"{_cell(entry.get('name', label))} |")
        if thresholds:
            row += f" {_number(thresholds[label]) if label in thresholds else '-'} |"
        lines.append(row)
    return [*lines, ""]


# --- publishing -------------------------------------------------------------------------

def _repo_id(repo_id: Any) -> str:
    text = repo_id[len(HUB_PREFIX):] if isinstance(repo_id, str) and repo_id.startswith(
        HUB_PREFIX) else repo_id
    if not (isinstance(text, str) and _REPO_ID.match(text)):
        raise UserError(f"repo id must be OWNER/NAME (letters, digits, '-', '_', '.'), got "
                        f"{repo_id!r}")
    return text


def _prepare_folder(folder: Path, repo_id: str) -> Path:
    """A model directory ready to upload: its config.json checked, model.safetensors
    there, and its model card written when missing or as dinodet wrote it (with the repo
    id now); a card someone edited is kept."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a model directory")
    meta = read_model_meta(folder / "config.json")
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder} is not a dinodet model directory: model.safetensors "
                              "missing")
    card = folder / "README.md"
    if is_generated_card(card, meta, repo_id):
        card.write_text(model_card(meta, repo_id), encoding="utf-8")
    return folder


def push_to_hub(source: str | Path | DINO | LoadedModel, repo_id: str, *,
                private: bool | None = None, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload a model to the Hub repo ``repo_id`` ("owner/name"; created if needed, with
    ``private`` when given) and return the URL of the commit. ``source``: a model
    directory of :func:`~dinodet.weights.save_pretrained` (its ``config.json``,
    ``model.safetensors`` and ``README.md`` are uploaded, nothing else; a missing or
    unedited card is written with the repo id first), a model, a
    :class:`~dinodet.weights.LoadedModel` or any model file
    :func:`~dinodet.weights.load_model` opens (saved to a temporary model directory with
    its classes, transform and thresholds). ``token``: default the login of
    ``hf auth login`` / ``HF_TOKEN``. Errors (offline, no login, no write access) are a
    :class:`~dinodet.errors.UserError` naming the repo."""
    from dinodet.model.dino import DINO

    repo = _repo_id(repo_id)
    hub = _hub_module()
    if _offline(hub):
        raise UserError(f"push to {repo} needs the network, and HF_HUB_OFFLINE is set")
    with tempfile.TemporaryDirectory(prefix="dinodet-push-") as tmp:
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            folder = _prepare_folder(Path(source), repo)
        else:
            loaded = source if isinstance(source, (DINO, LoadedModel)) else load_model(source)
            folder = Path(tmp) / "model"
            if isinstance(loaded, LoadedModel):
                save_pretrained(loaded.model, folder, extra={"classes": loaded.classes},
                                transform=loaded.transform,
                                class_thresholds=loaded.class_thresholds)
            else:
                save_pretrained(loaded, folder)
            _prepare_folder(folder, repo)
        api = hub.HfApi()
        try:
            options = {} if private is None else {"private": bool(private)}
            api.create_repo(repo, repo_type="model", exist_ok=True, token=token, **options)
            info = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder),
                                     allow_patterns=list(_UPLOADED), token=token,
                                     commit_message=commit_message
                                     or "Upload a dinodet model")
        except Exception as e:
            raise _push_error(repo, e) from e
    return str(getattr(info, "commit_url", None) or info)


def _push_error(repo: str, e: Exception) -> UserError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403) or "LocalTokenNotFoundError" in _kinds(e):
        return UserError(f"push to {repo}: not allowed ({_first_line(e)}): log in with "
                         "`hf auth login` or set HF_TOKEN to a token with write access to "
                         "the repo's owner")
    return UserError(f"push to {repo} failed: {_first_line(e)}")
