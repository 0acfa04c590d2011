"""Models on the Hugging Face Hub (dinodet.hub), without the network: a Hub cache is laid
out in tmp_path the way huggingface_hub writes it (and checked with its own reader), the
Hub is offline, and every socket connection fails and is recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants as hf_constants

import dinodet
from dinodet import cli
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.data.transforms import EvalTransform
from dinodet.errors import UserError
from dinodet.hub import HubModelUnavailableError, HubReference, hub_reference, push_to_hub
from dinodet.predict import Detector
from dinodet.weights import CheckpointError

CLASSES = [{"label": 0, "category_id": 5, "name": "cat"},
           {"label": 1, "category_id": 9, "name": "dog | puppy"}]
THRESHOLDS = {0: 0.41, 1: 0.5}
METRICS = {"AP": 0.49, "AP50": 0.671}
REPO = "user/repo"


def _config() -> DINOConfig:
    return DINOConfig(num_classes=2, backbone=BackboneConfig(
        name="resnet18", frozen_batchnorm=False, freeze_stem=False), hidden_dim=64,
        num_heads=4, enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=10,
        dn_number=4, num_select=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model saved with save_pretrained: classes, thresholds, metrics, license."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("saved") / "model"
    dinodet.save_pretrained(dinodet.build_model(_config()), out,
                            extra={"classes": CLASSES, "variant": "tiny-test"},
                            transform=EvalTransform(96, 128), class_thresholds=THRESHOLDS,
                            metrics=METRICS, license="apache-2.0")
    return out


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """Every socket connection and name lookup fails; the list records the attempts."""
    attempts: list[str] = []

    def refuse(what):
        def fail(*args, **kwargs):
            attempts.append(what)
            raise OSError(f"no network in this test ({what})")
        return fail

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    return attempts


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, no_network) -> Path:
    """An empty huggingface_hub cache under tmp_path, offline; the working directory is
    an empty folder (so ``user/repo`` is no local path). huggingface_hub reads its
    settings when imported, so they are set in its constants as well as the environment."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def _cache_repo(cache: Path, repo_id: str, files: dict[str, Path],
                commit: str = "0123456789abcdef0123456789abcdef01234567") -> str:
    """Lay ``files`` (name in the repo -> local file) out as huggingface_hub's cache holds
    a download of ``repo_id`` at ``commit`` on ``main``: models--owner--name/blobs/<hash>,
    snapshots/<commit>/<name> linking to its blob, refs/main holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(commit)
    # huggingface_hub's own reader of its cache sees exactly that
    found = {r.repo_id: r for r in huggingface_hub.scan_cache_dir(cache).repos}
    (revision,) = found[repo_id].revisions
    assert revision.commit_hash == commit and revision.refs == {"main"}
    assert {f.file_name for f in revision.files} == set(files)
    return commit


def _publish(cache: Path, model_dir: Path, repo_id: str = REPO) -> str:
    return _cache_repo(cache, repo_id, {name: model_dir / name for name in
                                        ("config.json", "model.safetensors", "README.md")})


def _image() -> torch.Tensor:
    return torch.rand(3, 72, 90, generator=torch.Generator().manual_seed(1))


# --- loading ------------------------------------------------------------------------------

def test_a_cached_repo_loads_offline_as_its_directory(hub_cache, model_dir, no_network):
    commit = _publish(hub_cache, model_dir)
    local = dinodet.load_pretrained(model_dir).state_dict()
    for source, revision in ((REPO, None), (f"hf://{REPO}", None), (f"{REPO}@main", None),
                             (f"hf://{REPO}@{commit}", None), (REPO, commit)):
        model = dinodet.load_pretrained(source, revision=revision)
        assert not model.training
        assert model.state_dict().keys() == local.keys()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, local[key], rtol=0, atol=0)
    loaded = dinodet.load_model(REPO)
    assert loaded.classes == CLASSES and loaded.class_thresholds == THRESHOLDS
    assert loaded.transform == EvalTransform(96, 128)
    assert loaded.weights.origin == f"hf://{REPO}@{commit}"
    assert loaded.weights.path == hub_cache / "models--user--repo" / "snapshots" / commit
    assert no_network == []


def test_the_detector_of_a_repo_detects_as_the_local_one(hub_cache, model_dir, no_network):
    _publish(hub_cache, model_dir)
    local = Detector.from_pretrained(model_dir, threshold=0.0)
    remote = Detector.from_pretrained(REPO, threshold=0.0)
    assert remote.source == REPO
    assert remote.class_names == ["cat", "dog | puppy"] == local.class_names
    assert remote.class_thresholds == THRESHOLDS and remote.transform == local.transform
    a, b = local(_image()), remote(_image())
    assert len(a) == len(b) > 0
    for name in ("boxes", "scores", "labels"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    assert no_network == []


def test_cli_predict_takes_a_repo_id_offline(hub_cache, model_dir, no_network, capsys):
    from PIL import Image

    _publish(hub_cache, model_dir)
    image = hub_cache.parent / "photo.png"
    Image.fromarray((_image().permute(1, 2, 0) * 255).byte().numpy()).save(image)
    results = {}
    for name, source in (("hub", REPO), ("local", str(model_dir))):
        out = hub_cache.parent / f"out-{name}"
        assert cli.main(["predict", source, str(image), "--out", str(out),
                         "--threshold", "0.0"]) == 0
        results[name] = json.loads((out / "detections.json").read_text())
    assert results["hub"] == results["local"] and results["hub"][0]["detections"]
    assert no_network == []


def test_offline_and_not_cached_says_how_to_get_it(hub_cache, no_network, capsys):
    with pytest.raises(HubModelUnavailableError) as caught:
        dinodet.load_pretrained("someone/missing")
    message = str(caught.value)
    for part in ("someone/missing", "config.json", "HF_HUB_OFFLINE",
                 "hf download someone/missing config.json model.safetensors",
                 "huggingface-cli download", "--local-dir", str(hub_cache)):
        assert part in message
    with pytest.raises(HubModelUnavailableError, match="someone/missing"):
        Detector.from_pretrained("someone/missing")
    torch.save({}, "photo.jpg")  # any file: the model fails first
    assert cli.main(["predict", "someone/missing", "photo.jpg", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinodet predict: error: ") and "Traceback" not in err
    assert "someone/missing" in err and "HF_HUB_OFFLINE" in err
    assert cli.main(["export", "someone/missing", "--out", "m.onnx"]) == 2
    assert "someone/missing" in capsys.readouterr().err
    assert no_network == []


def test_a_repo_without_model_safetensors_is_named_so(hub_cache, model_dir):
    _cache_repo(hub_cache, REPO, {"config.json": model_dir / "config.json"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not in"):
        dinodet.load_pretrained(REPO)


def test_a_repo_of_pickles_is_refused_and_never_downloaded(hub_cache, tmp_path, monkeypatch):
    pickle = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, pickle)
    _cache_repo(hub_cache, REPO, {"pytorch_model.bin": pickle})
    asked: list[str] = []
    download = huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        asked.append(filename)
        return download(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(CheckpointError) as caught:
        dinodet.load_pretrained(REPO)
    assert "pytorch_model.bin: pickled weights, which dinodet never downloads" in str(
        caught.value)
    assert asked == ["config.json"]
    with pytest.raises(UserError, match="never downloaded"):
        dinodet.load_pretrained(f"hf://{REPO}/pytorch_model.bin")
    assert hub_reference(f"{REPO}.pt") is None  # a missing local file, not a repo


def test_a_repo_on_the_hub_without_the_files_names_what_is_missing(hub_cache, monkeypatch):
    """What the Hub answers for a file it does not have (EntryNotFoundError)."""
    from huggingface_hub.errors import EntryNotFoundError

    def absent(repo_id, filename, **kwargs):
        raise EntryNotFoundError(f"{filename} not found")

    class Api:
        def list_repo_files(self, repo_id, revision=None, token=None):
            return ["README.md", "checkpoint.pth"]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", absent)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(CheckpointError) as caught:
        dinodet.load_pretrained(REPO)
    message = str(caught.value)
    assert "user/repo is not a dinodet model repo: it has no config.json" in message
    assert "checkpoint.pth: pickled weights" in message


def test_which_strings_are_repo_ids(hub_cache, model_dir):
    assert hub_reference("a/b") == HubReference("a/b")
    assert hub_reference("hf://a/b@v1.0") == HubReference("a/b", "v1.0", explicit=True)
    assert hub_reference("a/b@refs/pr/1") == HubReference("a/b", "refs/pr/1")
    assert hub_reference("a/b", revision="dev") == HubReference("a/b", "dev")
    for local in (Path("a/b"), "./a/b", "/a/b", "~/a/b", "a/b/c", "runs/best.pt", "a",
                  "models/m.safetensors", "a/.b", "C:/x"):
        assert hub_reference(local) is None, local
    with pytest.raises(UserError, match="give one"):
        hub_reference("a/b@v1", revision="v2")
    with pytest.raises(UserError, match="hf://OWNER/NAME"):
        hub_reference("hf://just-a-name")
    # a local folder of that name wins; hf:// still reaches the repo
    shutil.copytree(model_dir, Path(REPO))
    assert hub_reference(REPO) is None and hub_reference(f"hf://{REPO}") is not None
    assert dinodet.load_model(REPO).weights.origin is None
    with pytest.raises(UserError, match="drop the revision"):
        dinodet.load_pretrained(REPO, revision="main")


# --- the model card -----------------------------------------------------------------------

def test_save_pretrained_writes_a_model_card(model_dir):
    text = (model_dir / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"library_name": "dinodet", "tags": ["object-detection", "dino"],
                     "pipeline_tag": "object-detection", "license": "apache-2.0"}
    assert "# DINO object detector (tiny-test)" in text
    assert "| backbone | resnet18 |" in text and "| classes | 2 |" in text
    assert "shorter side is 96 px, the longer side at most 128 px" in text
    assert "| AP | 0.49 |" in text and "| AP50 | 0.671 |" in text
    assert "| label | category id | name | score threshold |" in text
    assert "| 0 | 5 | cat | 0.41 |" in text
    assert "| 1 | 9 | dog \\| puppy | 0.5 |" in text
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["metrics"] == METRICS and meta["license"] == "apache-2.0"


def test_a_card_without_classes_or_metrics(tmp_path):
    out = dinodet.save_pretrained(dinodet.build_model(_config()), tmp_path / "m")
    text = (out / "README.md").read_text()
    assert "license:" not in text and "## Metrics" not in text
    assert "No class table: class index i is category id i, of 2" in text
    with pytest.raises(UserError, match="finite number"):
        dinodet.save_pretrained(dinodet.build_model(_config()), tmp_path / "n",
                                metrics={"AP": float("nan")})
    with pytest.raises(UserError, match="license id"):
        dinodet.save_pretrained(dinodet.build_model(_config()), tmp_path / "n",
                                license="Apache 2.0\nx: y")
    assert not (tmp_path / "n").exists()  # checked before anything is written


# --- publishing ---------------------------------------------------------------------------

@pytest.fixture
def fake_api(hub_cache, monkeypatch) -> list[tuple[str, dict]]:
    """HfApi replaced by a recorder (online, but still without sockets); upload_folder
    records the files of the folder as it is at the call."""
    calls: list[tuple[str, dict]] = []

    class Api:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            calls.append(("upload_folder", {**kwargs, "files": sorted(
                p.name for p in folder.iterdir()), "card": (folder / "README.md").read_text()}))
            return "https://huggingface.co/me/det/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return calls


def test_push_to_hub_uploads_the_model_directory(fake_api, model_dir, tmp_path, no_network):
    folder = tmp_path / "to-push"
    shutil.copytree(model_dir, folder)
    (folder / "stray.pt").write_bytes(b"a pickle")
    url = push_to_hub(folder, "me/det", private=True, token="hf_secret")
    assert url == "https://huggingface.co/me/det/commit/abc"
    (create, kwargs), (upload, options) = fake_api
    assert create == "create_repo" and kwargs == {"repo_id": "me/det", "repo_type": "model",
                                                  "exist_ok": True, "private": True,
                                                  "token": "hf_secret"}
    assert upload == "upload_folder"
    assert options["repo_id"] == "me/det" and options["repo_type"] == "model"
    assert options["folder_path"] == str(folder) and options["token"] == "hf_secret"
    assert sorted(options["allow_patterns"]) == ["README.md", "config.json",
                                                 "model.safetensors"]
    # the card as dinodet wrote it is rewritten with the repo id; an edited one is kept
    assert 'Detector.from_pretrained("me/det")' in options["card"]
    (folder / "README.md").write_text("# my own card\n")
    push_to_hub(folder, "hf://me/det")
    assert fake_api[-1][1]["card"] == "# my own card\n"
    assert "private" not in fake_api[-2][1] and fake_api[-2][1]["token"] is None
    assert no_network == []


def test_push_a_model_object_and_from_the_cli(fake_api, model_dir, tmp_path, capsys):
    push_to_hub(dinodet.load_model(model_dir), "me/det")
    options = fake_api[-1][1]
    assert options["files"] == ["README.md", "config.json", "model.safetensors"]
    assert "| 0 | 5 | cat | 0.41 |" in options["card"]  # classes and thresholds went along
    assert not Path(options["folder_path"]).exists()  # the temporary folder is gone
    folder = shutil.copytree(model_dir, tmp_path / "to-push")
    assert cli.main(["push", str(folder), "me/det", "--message", "v1"]) == 0
    assert fake_api[-1][1]["commit_message"] == "v1"
    assert "pushed" in capsys.readouterr().out
    for bad in (["push", str(model_dir), "not a repo"], ["push", "missing-dir", "me/det"]):
        assert cli.main(bad) == 2
    assert "repo id must be OWNER/NAME" in capsys.readouterr().err


def test_push_offline_is_an_error(hub_cache, model_dir, capsys):
    assert cli.main(["push", str(model_dir), "me/det"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_attached_thresholds_reach_the_card_unless_it_was_edited(tmp_path):
    from dinodet.weights import attach_class_thresholds

    out = dinodet.save_pretrained(dinodet.build_model(_config()), tmp_path / "m",
                                  extra={"classes": CLASSES})
    assert "score threshold" not in (out / "README.md").read_text()
    attach_class_thresholds(out, {"1": 0.3})
    assert "| 1 | 9 | dog \\| puppy | 0.3 |" in (out / "README.md").read_text()
    (out / "README.md").write_text("# mine\n")
    attach_class_thresholds(out, None)
    assert (out / "README.md").read_text() == "# mine\n"
