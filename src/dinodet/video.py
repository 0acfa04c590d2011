"""Detection on video: video files, folders of frames, cameras and streams, in and out.

``detect_video(detector, "clip.mp4", "out/clip.mp4", "out/clip.jsonl")`` reads the frames
one by one, detects them in batches, and writes an annotated video (same size, same frame
rate) and one JSON line per frame; nothing holds more than one batch of frames.

Sources (:func:`open_video`):

* a video file (:data:`VIDEO_EXTENSIONS`, or any file FFmpeg reads);
* a folder of image frames (``frames/000001.png`` ...), in natural order (``f2`` before
  ``f10``) at a given frame rate (``fps``, default 25). A folder is a video only when asked
  (``dinodet predict --video``): a folder of numbered photos is just as common, and stays a
  set of images;
* a camera by its index (``"0"``: ``/dev/video0`` through v4l2 on Linux, AVFoundation on
  macOS) and a stream by its URL (``rtsp://``, ``http(s)://``, ``rtmp://``, ``udp://``,
  ...), open-ended: Ctrl-C ends them (``catch_interrupt=True``) as the end of a file does.

Why PyAV (``pip install dinodet[video]``): its wheels bundle FFmpeg's libraries, so no
system FFmpeg or OpenCV build is needed and every platform decodes the same formats; it
gives every frame its exact presentation timestamp from the container (no frame counting
that drifts on variable-frame-rate files); and a decode error is a Python exception
(``av.error.FFmpegError``) at the packet where it happens, with FFmpeg's reason, where
OpenCV's ``VideoCapture.read()`` only returns False, so a corrupt file can say where it
stopped and why. (A file cut short often decodes to its cut without any error: that is
found by comparing the frames decoded with the count or duration the container states.)

The outputs:

* the annotated video is a fragmented MP4 (``movflags=frag_keyframe+empty_moov``): H.264
  (libx264, which PyAV's wheels bundle; yuv420p, or yuv444p for an odd width or height)
  or, where this FFmpeg has no libx264, MPEG-4 Part 2. A fragmented MP4 stays playable up
  to its last complete fragment when the run is killed. Its frame rate is the source's
  average one (or ``fps``), constant; the JSON keeps the source's own timestamps;
* the JSON is JSON Lines, written and flushed after every batch, so a killed run leaves
  valid lines for the frames done (at most its last line cut; :func:`read_video_detections`
  skips it). Line 1 describes the source, ``{"source", "width", "height", "fps", "frames"
  (stated or estimated from the duration; null for a live source), "video"}``; then one
  line per frame, ``{"frame": i, "time": seconds, "detections": [{"box": [x0, y0, x1, y1],
  "score", "label", "name"}]}``, ``time`` from the source's start (a live source: from its
  first frame); the last line, ``{"summary": {"frames", "end", "stopped"}}``, says how the
  run ended, and a run without it was killed.

A corrupt or truncated source keeps what was decoded: the frames before the error are
detected and written, and the run ends with ``"end": "error"`` and ``"stopped": {"frame":
N, "time": t, "error": "..."}`` (frame N is the first one missing), said as a warning and
in :meth:`VideoResult.describe`. A file that ends before the frame count (or duration) its
container states counts as truncated too. A file that is not a video at all is a
:class:`VideoReadError` naming it; so is an MP4 cut before its index (an MP4 written
without ``faststart`` keeps its index, the ``moov`` atom, at its end).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from dinodet.data.images import IMAGE_EXTENSIONS, ImageReadError, load_image
from dinodet.errors import DataError, UserError

if TYPE_CHECKING:
    from dinodet.predict import Detector, Threshold

__all__ = ["DEFAULT_FPS", "STREAM_SCHEMES", "VIDEO_EXTENSIONS", "Frame", "StopPoint",
           "VideoReadError", "VideoReader", "VideoResult", "VideoWarning", "detect_video",
           "is_live_input", "is_video_input", "open_video", "output_paths", "read_video_detections",
           "video_codec"]

#: File name endings taken for a video (any file FFmpeg reads works through detect_video).
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts",
                    ".m2ts", ".mts", ".wmv", ".flv", ".3gp", ".ogv")
#: URL schemes read as a live stream.
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt",
                  "rtp")
#: The frame rate of a folder of frames, and of a stream that states none, unless given.
DEFAULT_FPS = 25
#: Seconds to wait for a stream or camera to open, and then for each packet.
STREAM_TIMEOUT = 15.0

_INSTALL = "video needs PyAV: pip install 'dinodet[video]' (or pip install av)"
_MP4_FLAGS = "frag_keyframe+empty_moov+default_base_moof"
End = Literal["complete", "max-frames", "interrupted", "error"]


class VideoReadError(DataError):
    """A video source that cannot be opened: missing, not a video, no video stream, or a
    camera / stream that does not answer. The message names it."""


class VideoWarning(UserWarning):
    """A video source stopped early (decode error, truncation); the frames before count."""


@dataclass
class Frame:
    """One decoded frame: its index from 0, its time in seconds from the source's start,
    and its pixels, RGB uint8 [3, H, W]."""

    index: int
    time: float
    image: Tensor


@dataclass
class StopPoint:
    """Where a source stopped early: ``frame`` is the index of the first frame missing,
    ``time`` its time (seconds), ``error`` why."""

    frame: int
    time: float
    error: str

    def describe(self) -> str:
        return f"stopped at frame {self.frame} (t={self.time:.3f} s): {self.error}"

    def to_dict(self) -> dict[str, Any]:
        return {"frame": self.frame, "time": round(self.time, 6), "error": self.error}


def _scheme(item: str) -> str | None:
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", item)
    return match.group(1).lower() if match and match.group(1).lower() in STREAM_SCHEMES \
        else None


def is_live_input(item: str) -> bool:
    """Whether ``item`` names a live source: a stream URL (:data:`STREAM_SCHEMES`) or a
    camera (an index such as ``"0"``, or ``/dev/videoN``)."""
    return bool(_scheme(item) or item.isdigit() or re.fullmatch(r"/dev/video\d+", item))


def is_video_input(item: str, frames: bool = False) -> bool:
    """Whether ``dinodet predict`` reads ``item`` as a video: a stream URL, a camera index
    (``"0"``, or ``/dev/videoN``), a file named as a video (:data:`VIDEO_EXTENSIONS`,
    whether it exists or not, so that a missing one is an error naming it), or with
    ``frames`` a folder (its images are the frames). Everything else is an image input."""
    if is_live_input(item):
        return True
    path = Path(item)
    if path.is_dir():
        return frames
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _natural_key(name: str) -> list[Any]:
    # re.split with a group alternates text and digits, so like compares with like
    return [int(part) if i % 2 else part.lower()
            for i, part in enumerate(re.split(r"(\d+)", name))]


def _as_fraction(rate: Any) -> Fraction | None:
    if rate is None:
        return None
    value = Fraction(rate).limit_denominator(100_000)
    return value if value > 0 else None


class VideoReader:
    """Frames of one source, in order: iterate for :class:`Frame` s, then ``stopped``
    says where it stopped early (None: it ended normally). Use it as a context manager
    (or :meth:`close` it). ``fps``: the source's average frame rate (None when it states
    none); ``frame_count``: the frames it states, or as many as its duration holds (None
    for a live source); ``live``: a camera or stream, with no end of its own."""

    name: str
    fps: Fraction | None = None
    frame_count: int | None = None
    live: bool = False
    stopped: StopPoint | None = None

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the source (safe to call twice)."""

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FrameFolder(VideoReader):
    """The images of a folder as frames, in natural name order, ``fps`` frames a second.
    An unreadable frame, or one of another size than the first, stops the video there."""

    def __init__(self, folder: Path, fps: Fraction) -> None:
        self.name = str(folder)
        self.files = sorted((p for p in folder.iterdir()
                             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                            key=lambda p: _natural_key(p.name))
        if not self.files:
            raise VideoReadError(f"no image frames in folder {folder} (frames are "
                                 f"{', '.join(IMAGE_EXTENSIONS)} files)")
        self.fps = self._rate = fps
        self.frame_count = len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        size: tuple[int, int] | None = None
        for index, file in enumerate(self.files):
            time = float(index / self._rate)
            try:
                image = load_image(file)
            except ImageReadError as e:
                self.stopped = StopPoint(index, time, str(e))
                return
            shape = (int(image.shape[1]), int(image.shape[2]))
            if size is not None and shape != size:
                self.stopped = StopPoint(index, time, (
                    f"frame {file} is {shape[1]}x{shape[0]}, the frames before it "
                    f"{size[1]}x{size[0]}"))
                return
            size = shape
            yield Frame(index, time, image)


class _AVSource(VideoReader):
    """A file, camera or stream read by PyAV: frames with their container timestamps."""

    def __init__(self, name: str, container: Any, live: bool) -> None:
        self.name = name
        self.live = live
        self._container = container
        if not container.streams.video:
            container.close()
            raise VideoReadError(f"{name} has no video stream")
        self._stream = stream = container.streams.video[0]
        self.fps = _as_fraction(stream.average_rate) or _as_fraction(stream.guessed_rate)
        self._duration: float | None = None
        if not live:
            if stream.frames:
                self.frame_count = int(stream.frames)
            if stream.duration is not None and stream.time_base is not None:
                self._duration = float(stream.duration * stream.time_base)
            # else an estimate, for the progress bar: from the stream's duration, else the
            # container's (Matroska and WebM state no frame count)
            seconds = self._duration if self._duration is not None else (
                container.duration / 1_000_000 if container.duration else None)
            if self.frame_count is None and self.fps and seconds:
                self.frame_count = max(1, round(seconds * self.fps))

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[Frame]:
        import av

        stream = self._stream
        start = (float(stream.start_time * stream.time_base)
                 if stream.start_time is not None and stream.time_base is not None
                 and not self.live else None)
        step = 1 / float(self.fps) if self.fps else 1 / DEFAULT_FPS
        index, last = 0, None
        packet_time: float | None = None

        def frame_of(decoded: Any) -> Frame:
            nonlocal start, last
            if decoded.time is not None:
                if start is None:
                    start = float(decoded.time)
                time = float(decoded.time) - start
            else:
                time = index * step if last is None else last + step
            last = time
            pixels = torch.from_numpy(decoded.to_ndarray(format="rgb24")).permute(2, 0, 1)
            return Frame(index, time, pixels)

        try:
            for packet in self._container.demux(stream):
                if packet.pts is not None and packet.time_base is not None:
                    packet_time = float(packet.pts * packet.time_base)
                for decoded in stream.decode(packet):
                    yield frame_of(decoded)
                    index += 1
        except av.error.FFmpegError as e:
            # frames the decoder still holds (threads delay its output) came before the
            # error: let them out, then stop
            with contextlib.suppress(av.error.FFmpegError):
                for decoded in stream.decode(None):
                    yield frame_of(decoded)
                    index += 1
            at = last + step if last is not None else 0.0
            if packet_time is not None and start is not None:
                at = max(at, packet_time - start)
            self.stopped = StopPoint(index, at, _describe_av_error(e))
            return
        if not self.live:  # a stream that ends has no length to check against
            self._check_length(index, last, step)

    def _check_length(self, index: int, last: float | None, step: float) -> None:
        """A file that ends before the length it states was cut short: FFmpeg reads a
        truncated file to its end without an error."""
        at = last + step if last is not None else 0.0
        stream = self._stream
        if stream.frames and index < int(stream.frames) - 1:
            self.stopped = StopPoint(index, at, (
                f"the file ends after {index} of the {int(stream.frames)} frames it states "
                "(truncated?)"))
        elif (not stream.frames and self._duration is not None
              and at + step < self._duration - 1e-6):
            self.stopped = StopPoint(index, at, (
                f"the file ends at {at:.3f} s of the {self._duration:.3f} s it states "
                "(truncated?)"))


def _describe_av_error(e: BaseException) -> str:
    """``[Errno 1094995529] Invalid data found when processing input: 'x'`` ->
    ``InvalidDataError: Invalid data found when processing input``: the error's type and
    FFmpeg's reason, without the number and the function or file (the message names it)."""
    reason = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {reason}"


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise UserError(_INSTALL) from None
    return av


def open_video(source: str | Path, fps: float | Fraction | None = None,
               frames: bool | None = None) -> VideoReader:
    """A :class:`VideoReader` of ``source``: a video file, a folder of frames (``frames``
    None: any folder is one), a camera index (``"0"``) or a stream URL. ``fps`` is the
    frame rate of a frame folder (default :data:`DEFAULT_FPS`); other sources keep their
    own. Raises :class:`VideoReadError` naming a source that cannot be opened."""
    text = str(source)
    path = Path(source)
    if path.is_dir() and frames is not False:
        rate = _as_fraction(fps) if fps is not None else Fraction(DEFAULT_FPS)
        if rate is None:
            raise UserError(f"fps must be > 0, got {fps}")
        return _FrameFolder(path, rate)
    av = _av()
    if isinstance(source, str) and is_live_input(text):
        return _open_live(av, text)
    if not path.exists():
        raise VideoReadError(f"no video file at {text}")
    if not path.is_file():
        raise VideoReadError(f"{text} is not a regular file (a video file, or with --video "
                             "a folder of frames)")
    try:
        container = av.open(text)
    except av.error.FFmpegError as e:
        raise VideoReadError(
            f"{text} is not a video PyAV can read ({_describe_av_error(e)}); an MP4 cut "
            "short before its index (the 'moov' atom, at the end unless written with "
            "faststart) cannot be read either") from None
    return _AVSource(text, container, live=False)


def _open_live(av: Any, source: str) -> VideoReader:
    """A camera (index or /dev/videoN) or a stream URL, with a timeout on opening and on
    every read (:data:`STREAM_TIMEOUT`), so a silent stream ends instead of hanging."""
    options: dict[str, str] = {}
    fmt: str | None = None
    file = source
    if not _scheme(source):
        if sys.platform.startswith("linux"):
            fmt, file = "v4l2", source if source.startswith("/dev/") else f"/dev/video{source}"
        elif sys.platform == "darwin" and source.isdigit():
            fmt, options = "avfoundation", {"framerate": "30"}
        else:
            raise VideoReadError(f"camera {source}: cameras by index are read on Linux "
                                 "(v4l2) and macOS (AVFoundation); elsewhere give the "
                                 "camera's stream URL")
        what = f"camera {source}"
    else:
        what = f"stream {source}"
        if _scheme(source) in ("rtsp", "rtsps"):
            options["rtsp_transport"] = "tcp"  # no lost UDP packets, through firewalls
    try:
        container = av.open(file, format=fmt, options=options,
                            timeout=(STREAM_TIMEOUT, STREAM_TIMEOUT))
    except av.error.FFmpegError as e:
        raise VideoReadError(f"cannot open {what}: {_describe_av_error(e)}") from None
    return _AVSource(source, container, live=True)


def video_codec() -> str:
    """The encoder of annotated videos: ``libx264`` (H.264) where this FFmpeg has it,
    else ``mpeg4`` (MPEG-4 Part 2, in every FFmpeg build)."""
    av = _av()
    try:
        av.codec.Codec("libx264", "w")
    except Exception:
        return "mpeg4"
    return "libx264"


class _VideoWriter:
    """An annotated video, opened on its first frame (whose size it takes)."""

    def __init__(self, path: Path, fps: Fraction, codec: str | None) -> None:
        self.path = path
        self.fps = fps
        self.codec = codec or video_codec()
        self.frames = 0
        self._container: Any = None
        self._stream: Any = None

    def _open(self, width: int, height: int) -> None:
        av = _av()
        suffix = self.path.suffix.lower()
        options = {"movflags": _MP4_FLAGS} if suffix in (".mp4", ".m4v", ".mov") else {}
        self._container = av.open(str(self.path), "w", options=options)
        stream_options = {"bf": "0"} if self.codec == "libx264" else {}
        stream = self._container.add_stream(self.codec, rate=self.fps,
                                            options=stream_options)
        stream.width, stream.height = width, height
        odd = width % 2 or height % 2  # 4:2:0 halves both sides: libx264 needs them even
        stream.pix_fmt = "yuv444p" if self.codec == "libx264" and odd else "yuv420p"
        if self.codec != "libx264":  # mpeg4's default 200 kb/s smears a 1080p frame
            stream.bit_rate = max(1_000_000, int(width * height * float(self.fps) * 0.2))
        self._stream = stream

    def write(self, image: Any) -> None:
        """Encode one annotated frame (a PIL image)."""
        av = _av()
        if self._container is None:
            self._open(*image.size)
        frame = av.VideoFrame.from_image(image)
        frame.pts = self.frames
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (nothing was opened: nothing to do)."""
        if self._container is None:
            return
        container, self._container = self._container, None
        try:
            for packet in self._stream.encode(None):
                container.mux(packet)
        finally:
            container.close()


@dataclass
class VideoResult:
    """How a :func:`detect_video` run ended: ``frames`` detected and written; ``end``:
    ``"complete"`` (the whole source), ``"max-frames"``, ``"interrupted"`` (Ctrl-C) or
    ``"error"`` (``stopped`` says where and why); ``live``: a camera or stream."""

    source: str
    video: Path | None
    json: Path
    frames: int
    fps: float
    size: tuple[int, int] | None
    end: End
    stopped: StopPoint | None = None
    codec: str = ""
    live: bool = False

    def describe(self) -> str:
        """One line: the source, the frames, the outputs, how it ended."""
        outputs = ", ".join(str(p) for p in (self.video, self.json) if p is not None)
        line = f"{self.source}: {self.frames} frame(s) -> {outputs}"
        if self.video is None:
            line += " (no frame decoded: no video written)"
        if self.stopped is not None:
            line += f"; {self.stopped.describe()}"
        elif self.end == "interrupted":
            line += "; interrupted"
        elif self.end == "max-frames":
            line += "; stopped at --max-frames"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "end": self.end,
                "stopped": self.stopped.to_dict() if self.stopped else None}


def _name_of(source: str) -> str:
    """A file name stem for the outputs of ``source``."""
    if source.isdigit():
        return f"camera{source}"
    if re.fullmatch(r"/dev/video\d+", source):
        return f"camera{source.removeprefix('/dev/video')}"
    if _scheme(source):
        rest = source.split("://", 1)[1].split("?", 1)[0].rstrip("/")
        stem = Path(rest.rsplit("/", 1)[-1]).stem or rest.split("/", 1)[0]
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "stream"
    return Path(source).stem or Path(source).resolve().name or "video"


def output_paths(sources: Sequence[str], out_dir: str | Path) -> list[tuple[Path, Path]]:
    """(annotated video, JSON lines) of every source in ``out_dir``: ``NAME.mp4`` and
    ``NAME.jsonl``, NAME the file's or folder's stem (``camera0``, the last part of a URL),
    with ``_2``, ``_3`` ... where two share one. Refuses (:class:`UserError`) an
    ``out_dir`` that holds an input video or is a frame folder: no output may land on an
    input."""
    import os

    out = Path(out_dir)
    for source in sources:
        path = Path(source)
        if not out.is_dir() or not path.exists():
            continue
        folder = path if path.is_dir() else path.parent
        with contextlib.suppress(OSError):
            if os.path.samefile(folder, out):
                raise UserError(f"--out {out} holds the input {source}: the annotated video "
                                "and its JSON would be written beside (or onto) it; give "
                                "another --out folder")
    paths, used = [], set()
    for source in sources:
        stem = name = _name_of(source)
        n = 1
        while name in used:
            n += 1
            name = f"{stem}_{n}"
        used.add(name)
        paths.append((out / f"{name}.mp4", out / f"{name}.jsonl"))
    return paths


def _record(frame: Frame, found: Any) -> dict[str, Any]:
    return {"frame": frame.index, "time": round(frame.time, 6),
            "detections": [{"box": box, "score": score, "label": label, "name": name}
                           for box, score, label, name in zip(
                               found.boxes.tolist(), found.scores.tolist(),
                               found.labels.tolist(), found.names)]}


def detect_video(detector: Detector, source: str | Path | VideoReader,
                 out_video: str | Path | None, out_json: str | Path, *, batch_size: int = 4,
                 threshold: Threshold | None = None, fps: float | None = None,
                 max_frames: int | None = None, progress: bool = True,
                 codec: str | None = None, catch_interrupt: bool = False,
                 warn: Callable[[str], None] | None = None) -> VideoResult:
    """Detect every frame of ``source`` (a path, camera index, URL or an open
    :class:`VideoReader`) in batches of ``batch_size``; write the annotated frames to
    ``out_video`` (None: no video) and one JSON line per frame to ``out_json`` (see the
    module's docstring). Streaming: one batch of frames in memory at a time.

    ``fps``: the frame rate of a frame folder (default 25), and of the annotated video
    (default the source's; 25 for a source that states none). ``max_frames``: stop after
    so many. ``progress``: a tqdm bar (a total where the source states its length).
    ``codec``: the encoder (default :func:`video_codec`). ``catch_interrupt``: Ctrl-C ends
    the run like the end of the source (``end="interrupted"``) instead of raising, the
    way to stop a camera. A source that stops early (decode error, truncation) ends it
    with ``end="error"`` and a warning through ``warn`` (default: a
    :class:`VideoWarning`); the outputs are finished in every case, also when the model
    fails (that error is raised after)."""
    from tqdm import tqdm

    from dinodet.visualize import draw_detections

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise UserError(f"fps must be a number > 0, got {fps}")
    from dinodet.predict import check_threshold, no_thresholds_error

    # "auto" without thresholds is said before anything is read or written
    threshold = detector.threshold if threshold is None else check_threshold(threshold)
    if threshold == "auto" and not detector.class_thresholds:
        raise no_thresholds_error(detector.source)
    reader = source if isinstance(source, VideoReader) else open_video(source, fps)
    say = warn or (lambda message: warnings.warn(message, VideoWarning, stacklevel=3))
    rate = _as_fraction(fps) if fps is not None else reader.fps
    if rate is None:
        rate = Fraction(DEFAULT_FPS)
        say(f"{reader.name} states no frame rate: the annotated video is written at "
            f"{DEFAULT_FPS} fps (give fps / --fps)")
    json_path = Path(out_json)
    video_name = Path(out_video).name if out_video is not None else None
    json_path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    if out_video is not None:
        Path(out_video).parent.mkdir(parents=True, exist_ok=True)
        writer = _VideoWriter(Path(out_video), rate, codec)
    total = reader.frame_count
    if max_frames is not None and total is not None:
        total = min(total, max_frames)
    bar = tqdm(total=total, unit="frame", disable=not progress, dynamic_ncols=True,
               desc=_name_of(reader.name), leave=True)
    done, size = 0, None
    end: End = "complete"
    failure: StopPoint | None = None
    header_written = False

    with reader, json_path.open("w", encoding="utf-8", newline="\n") as lines:

        def write_header(height: int | None, width: int | None) -> None:
            nonlocal header_written
            header = {"source": reader.name, "width": width, "height": height,
                      "fps": float(rate), "frames": total,
                      "video": video_name}
            lines.write(json.dumps(header) + "\n")
            header_written = True

        def run(batch: list[Frame]) -> None:
            nonlocal done
            # one call, one model batch (a sliced detector: its tiles, batch_size a call)
            found = detector([f.image for f in batch], threshold=threshold,
                             batch_size=batch_size)
            assert isinstance(found, list)
            text = io.StringIO()
            for frame, detections in zip(batch, found):
                if writer is not None:
                    writer.write(draw_detections(frame.image, detections.boxes,
                                                 detections.labels, detections.scores,
                                                 detections.class_names))
                text.write(json.dumps(_record(frame, detections)) + "\n")
            lines.write(text.getvalue())  # a batch's lines in one write, then flushed
            lines.flush()
            done += len(batch)
            bar.update(len(batch))

        try:
            try:
                batch: list[Frame] = []
                for frame in reader:
                    if not header_written:
                        size = (int(frame.image.shape[1]), int(frame.image.shape[2]))
                        write_header(*size)
                    batch.append(frame)
                    if max_frames is not None and done + len(batch) >= max_frames:
                        end = "max-frames"
                        break
                    if len(batch) == batch_size:
                        run(batch)
                        batch = []
                if batch:
                    run(batch)
                    batch = []
            except KeyboardInterrupt:
                end = "interrupted"
                if not catch_interrupt:
                    raise
            except BaseException as e:  # the model or the writer: said in the JSON, raised
                end = "error"
                reason = str(e).strip().splitlines()
                failure = StopPoint(done, batch[0].time if batch else 0.0,
                                    f"{type(e).__name__}: {reason[0] if reason else ''}"
                                    .rstrip(": "))
                raise
            if end == "complete" and reader.stopped is not None:
                end, failure = "error", reader.stopped
                say(f"{reader.name}: {reader.stopped.describe()}; the {done} frame(s) "
                    "before it are kept")
        finally:
            bar.close()
            try:
                if writer is not None:
                    writer.close()
            finally:
                if not header_written:
                    write_header(None, None)
                result = VideoResult(
                    reader.name, writer.path if writer is not None and writer.frames
                    else None, json_path, done, float(rate), size, end,
                    failure,
                    writer.codec if writer is not None else "", reader.live)
                lines.write(json.dumps({"summary": result.to_dict()}) + "\n")
    if writer is not None and not writer.frames:
        with contextlib.suppress(OSError):  # opened on the first frame: none was written
            Path(writer.path).unlink(missing_ok=True)
    return result


def read_video_detections(path: str | Path) -> dict[str, Any]:
    """The JSON lines of :func:`detect_video` as ``{"header": {...}, "frames": [...],
    "summary": {...} or None}``; summary None: the run was killed (a last line cut by the
    kill is left out). Raises :class:`DataError` naming the file and line of any other
    line that is not JSON."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows = text.split("\n")
    found: dict[str, Any] = {"header": None, "frames": [], "summary": None}
    for number, row in enumerate(rows, 1):
        if not row.strip():
            continue
        try:
            item = json.loads(row)
        except json.JSONDecodeError as e:
            if number == len(rows):  # the last line, without its newline: cut by a kill
                break
            raise DataError(f"{path}:{number}: not a JSON line ({e})") from None
        if "summary" in item:
            found["summary"] = item["summary"]
        elif "frame" in item:
            found["frames"].append(item)
        elif found["header"] is None:
            found["header"] = item
    return found
