"""Video in `dinodet predict`: files, frame folders, truncated and non-video files, the CLI.

The videos are made here with PyAV: a white square moving over black."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.cli import main
from dinodet.predict import Detector
from tiny_models import save_tiny_model

av = pytest.importorskip("av")

from dinodet.video import (  # noqa: E402  (after the skip: needs PyAV)
    VideoReadError,
    VideoWarning,
    detect_video,
    is_video_input,
    open_video,
    read_video_detections,
)

CLASSES = [{"label": 0, "category_id": 1, "name": "cat"},
           {"label": 1, "category_id": 2, "name": "dog"}]
W, H, N, FPS = 128, 96, 20, 10


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """One thread: a video's frames run one small batch after another, and on a busy
    machine a second thread costs more in waiting than it gains."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"), CLASSES, hidden_dim=32,
                           num_heads=2, dec_layers=1, dim_feedforward=64, num_queries=10,
                           dn_number=0, num_select=10)


@pytest.fixture(scope="module")
def det(model_dir) -> Detector:
    return Detector.from_pretrained(model_dir, threshold=0.0)


def _frame(i: int, w: int = W, h: int = H) -> np.ndarray:
    image = np.zeros((h, w, 3), np.uint8)
    x = (5 * i) % (w - 20)
    image[30:50, x:x + 20] = 255
    return image


def _write_video(path: Path, n: int = N, w: int = W, h: int = H, codec: str = "libx264",
                 intra: bool = False, faststart: bool = False) -> Path:
    """``n`` frames at FPS; ``intra``: every frame a keyframe, so that half the bytes hold
    about half the frames (a truncation keeps some)."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        stream = c.add_stream(codec, rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if intra:
            stream.codec_context.gop_size = 1
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i, w, h),
                                                                   format="rgb24")):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return path


def _decoded(path: Path) -> tuple[int, tuple[int, int], Fraction]:
    """(frames, (width, height), average rate) of a video, by decoding all of it."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        count = sum(1 for _ in c.decode(stream))
        return count, (stream.width, stream.height), stream.average_rate


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return _write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_video_file_gives_a_line_per_frame_and_a_same_sized_video(det, clip, tmp_path,
                                                                  monkeypatch):
    calls: list[int] = []
    detect_batch = det.detect_batch

    def counting(images, sizes, threshold=None):
        calls.append(len(sizes))
        return detect_batch(images, sizes, threshold)

    monkeypatch.setattr(det, "detect_batch", counting)
    result = detect_video(det, clip, tmp_path / "out.mp4", tmp_path / "out.jsonl",
                          batch_size=6, progress=False)
    assert calls == [6, 6, 6, 2]  # 20 frames in batches of 6: four model calls
    assert result.end == "complete" and result.stopped is None and result.frames == N
    assert result.size == (H, W) and result.fps == FPS

    found = read_video_detections(tmp_path / "out.jsonl")
    header, frames = found["header"], found["frames"]
    assert header["width"] == W and header["height"] == H and header["fps"] == FPS
    assert [f["frame"] for f in frames] == list(range(N))
    times = [f["time"] for f in frames]
    assert times[0] == 0 and all(a < b for a, b in itertools.pairwise(times))
    assert times == pytest.approx([i / FPS for i in range(N)])
    assert found["summary"] == {"frames": N, "end": "complete", "stopped": None}
    first = frames[0]["detections"][0]  # threshold 0: every query is kept
    assert set(first) == {"box", "score", "label", "name"}
    assert first["name"] in ("cat", "dog") and len(first["box"]) == 4

    assert _decoded(tmp_path / "out.mp4") == (N, (W, H), FPS)


@pytest.mark.parametrize("name, codec, faststart", [("cut.mkv", "libx264", False),
                                                    ("cut.mp4", "mpeg4", True)])
def test_truncated_video_keeps_the_frames_before_and_says_where(det, tmp_path, name, codec,
                                                                 faststart):
    path = _write_video(tmp_path / name, codec=codec, intra=True, faststart=faststart)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.warns(VideoWarning, match=r"stopped at frame \d+ \(t=[\d.]+ s\)"):
        result = detect_video(det, path, tmp_path / "out.mp4", tmp_path / "out.jsonl",
                              batch_size=4, progress=False)
    assert result.end == "error" and 0 < result.frames < N
    assert result.stopped is not None and result.stopped.frame == result.frames
    assert result.stopped.time == pytest.approx(result.frames / FPS)
    assert f"stopped at frame {result.frames} (t=" in result.describe()
    found = read_video_detections(tmp_path / "out.jsonl")
    assert len(found["frames"]) == result.frames
    assert found["summary"]["end"] == "error"
    assert found["summary"]["stopped"]["frame"] == result.frames
    assert found["summary"]["stopped"]["error"]
    assert _decoded(tmp_path / "out.mp4")[0] == result.frames


def test_not_a_video_is_an_error_naming_it(det, clip, tmp_path, capsys, model_dir):
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video at all\n")
    with pytest.raises(VideoReadError, match=r"notes\.mp4 is not a video"):
        open_video(notes)
    cut = tmp_path / "cut.mp4"  # moov at the end (no faststart): cut off with it
    cut.write_bytes(clip.read_bytes()[:clip.stat().st_size // 2])
    with pytest.raises(VideoReadError, match=r"cut\.mp4 is not a video.*moov"):
        detect_video(det, cut, tmp_path / "o.mp4", tmp_path / "o.jsonl", progress=False)
    assert not (tmp_path / "o.mp4").exists()

    rc = main(["predict", str(model_dir), str(notes), "--out", str(tmp_path / "out")])
    assert rc == 2 and "notes.mp4 is not a video" in capsys.readouterr().err
    rc = main(["predict", str(model_dir), str(tmp_path / "gone.mp4"), "--out",
               str(tmp_path / "out")])
    assert rc == 2 and "no video file at" in capsys.readouterr().err


def test_cli_writes_the_annotated_video_and_its_json_lines(model_dir, clip, tmp_path, capsys):
    short = _write_video(tmp_path / "short.mp4", n=6)
    out = tmp_path / "out"
    rc = main(["predict", str(model_dir), str(short), "--out", str(out), "--threshold", "0",
               "--batch-size", "4", "--no-progress"])
    assert rc == 0
    assert f"short.mp4: 6 frame(s) -> {out / 'short.mp4'}" in capsys.readouterr().out
    assert _decoded(out / "short.mp4") == (6, (W, H), FPS)
    found = read_video_detections(out / "short.jsonl")
    assert len(found["frames"]) == 6 and found["summary"]["end"] == "complete"

    rc = main(["predict", str(model_dir), str(clip), "--out", str(out), "--max-frames", "3",
               "--no-progress", "--workers", "2"])
    said = capsys.readouterr()
    assert rc == 0 and "stopped at --max-frames" in said.out
    assert ("--workers 2 is not used for videos: a video or a frame folder is read in order"
            in said.err)
    found = read_video_detections(out / "clip.jsonl")
    assert len(found["frames"]) == 3 and found["summary"]["end"] == "max-frames"
    # an output may never land on its input: --out the video's own folder is refused
    rc = main(["predict", str(model_dir), str(clip), "--out", str(clip.parent)])
    assert rc == 2 and "holds the input" in capsys.readouterr().err


def test_frame_folder_is_a_video_with_video_and_images_without(model_dir, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(10):  # frame_2 comes before frame_10: natural order
        Image.fromarray(_frame(i)).save(frames / f"frame_{i + 1}.png")
    names = [p.name for p in open_video(frames, fps=5).files]  # type: ignore[attr-defined]
    assert names[:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert names[-1] == "frame_10.png"
    assert not is_video_input(str(frames)) and is_video_input(str(frames), frames=True)

    out = tmp_path / "out"
    rc = main(["predict", str(model_dir), str(frames), "--video", "--fps", "5", "--out",
               str(out), "--no-progress"])
    assert rc == 0
    found = read_video_detections(out / "frames.jsonl")
    assert [f["time"] for f in found["frames"]] == pytest.approx([i / 5 for i in range(10)])
    assert _decoded(out / "frames.mp4") == (10, (W, H), 5)

    # without --video the folder is what it always was: its images
    rc = main(["predict", str(model_dir), str(frames), "--out", str(tmp_path / "images")])
    assert rc == 0 and len(json.loads((tmp_path / "images" / "detections.json")
                                      .read_text())) == 10


def test_a_frame_of_another_size_stops_the_folder_there(det, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(_frame(i)).save(frames / f"{i:03d}.png")
    Image.fromarray(_frame(3, w=64)).save(frames / "003.png")
    with pytest.warns(VideoWarning, match=r"stopped at frame 3 \(t=0\.600 s\).*003\.png"):
        result = detect_video(det, frames, None, tmp_path / "f.jsonl", fps=5, progress=False)
    assert result.frames == 3 and result.video is None


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_odd_sizes_and_the_mpeg4_encoder(det, tmp_path, codec):
    path = _write_video(tmp_path / "odd.mkv", n=3, w=127, h=95, codec="mpeg4")
    result = detect_video(det, path, tmp_path / "odd.mp4", tmp_path / "odd.jsonl",
                          codec=codec, progress=False)
    assert result.codec == (codec or "libx264")  # PyAV's wheels bundle libx264
    assert _decoded(tmp_path / "odd.mp4") == (3, (127, 95), FPS)


def test_cli_option_mistakes_are_said_before_the_model_loads(clip, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(_frame(0)).save(image)
    for args, said in ((["x.pt", str(clip), str(image)], "separate runs"),
                       (["x.pt", str(image), "--fps", "5"], "--fps only apply to video")):
        assert main(["predict", *args, "--out", str(tmp_path / "o")]) == 2
        assert said in capsys.readouterr().err


def test_json_lines_of_a_killed_run_read_up_to_the_cut(tmp_path):
    path = tmp_path / "killed.jsonl"
    path.write_text(json.dumps({"source": "x.mp4"}) + "\n"
                    + json.dumps({"frame": 0, "time": 0.0, "detections": []}) + "\n"
                    + '{"frame": 1, "ti')
    found = read_video_detections(path)
    assert found["header"] == {"source": "x.mp4"} and len(found["frames"]) == 1
    assert found["summary"] is None  # no summary line: the run did not finish


def test_ctrl_c_and_a_model_failure_leave_finished_outputs(det, clip, tmp_path, monkeypatch):
    detect_batch = det.detect_batch
    calls: list[int] = []

    def stop_on_the_third(images, sizes, threshold=None):
        calls.append(len(sizes))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return detect_batch(images, sizes, threshold)

    monkeypatch.setattr(det, "detect_batch", stop_on_the_third)
    result = detect_video(det, clip, tmp_path / "c.mp4", tmp_path / "c.jsonl", batch_size=4,
                          progress=False, catch_interrupt=True)
    assert result.end == "interrupted" and result.frames == 8
    assert read_video_detections(tmp_path / "c.jsonl")["summary"]["end"] == "interrupted"
    assert _decoded(tmp_path / "c.mp4")[0] == 8

    calls.clear()  # not caught: raised, after the outputs are finished all the same
    with pytest.raises(KeyboardInterrupt):
        detect_video(det, clip, tmp_path / "d.mp4", tmp_path / "d.jsonl", batch_size=4,
                     progress=False)
    found = read_video_detections(tmp_path / "d.jsonl")
    assert len(found["frames"]) == 8
    assert found["summary"] == {"frames": 8, "end": "interrupted", "stopped": None}
    assert _decoded(tmp_path / "d.mp4")[0] == 8

    def fails(images, sizes, threshold=None):
        raise RuntimeError("out of memory\nmore")

    monkeypatch.setattr(det, "detect_batch", fails)
    with pytest.raises(RuntimeError):
        detect_video(det, clip, None, tmp_path / "e.jsonl", batch_size=4, progress=False)
    assert read_video_detections(tmp_path / "e.jsonl")["summary"]["stopped"] == {
        "frame": 0, "time": 0.0, "error": "RuntimeError: out of memory"}
