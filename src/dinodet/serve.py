"""``dinodet serve``: a :class:`~dinodet.predict.Detector` over HTTP (FastAPI + uvicorn).

``POST /detect`` takes one image, as a multipart form (file field ``file`` or ``image``)
or as the raw body (``Content-Type: image/*`` or ``application/octet-stream``), with an
optional ``threshold`` (query or form field: a number in [0, 1] or ``auto``), and answers
``{"width", "height", "detections": [{"box", "score", "label", "class_name"}], "time_ms"}``
with boxes xyxy in pixels of the upright image. ``GET /health`` says the model is up,
``GET /stats`` counts requests and model calls, ``GET /`` is a page to try it in a browser.

Concurrent requests share model calls: each upload is decoded and resized in a thread of
its own pool, then queued; one worker takes up to ``max_batch`` queued images, waiting at
most ``max_wait_ms`` for more after the first, and runs them as one batch in the model's
thread, so the event loop keeps accepting uploads meanwhile. Images of different sizes are
zero-padded to one batch as in ``dinodet predict --batch-size N`` (the padding mask keeps
the detections close to those of the image alone, not bit-identical).

Bad uploads are answered, never fatal: a wrong content type is 415, bytes that are not an
image (or a broken one) 400, a body over ``max_request_bytes`` 413 (refused from its
Content-Length before it is read, else as soon as the stream passes the limit), an image
whose header declares more pixels than ``max_image_pixels`` 413 before any pixel is
decoded (the rule of :func:`dinodet.data.images.resolve_max_pixels`: None takes
``$DINODET_MAX_IMAGE_PIXELS`` or the default, 0 no limit). When the model fails on a
batch, its images are run one by one, so only the request at fault gets its 500.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from dinodet.data.images import (
    ImageFormatError,
    ImageReadError,
    ImageTooLargeError,
    decode_image,
    resolve_max_pixels,
)
from dinodet.predict import (
    Detections,
    Detector,
    Threshold,
    check_threshold,
    keep_above,
    no_thresholds_error,
)
from dinodet.structures import ImageBatch

try:
    import python_multipart  # noqa: F401  (starlette's form parser needs it)
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect
except ImportError as e:  # the CLI turns this into a one-line error
    raise ImportError(f"dinodet serve needs FastAPI, uvicorn and python-multipart ({e}): "
                      "pip install 'dinodet[serve]'") from e

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "UPLOAD_FORMATS", "Batcher", "ServeStats", "create_app",
           "serve"]

#: The largest request body ``POST /detect`` reads (20 MiB), unless told otherwise.
DEFAULT_MAX_REQUEST_BYTES = 20 * 1024 * 1024
#: After refusing a body (413, 415), up to this many more bytes of it are read and dropped
#: before the answer, so that an ordinary client that sends its whole upload first reads
#: the error instead of a connection reset; beyond it the connection is just closed.
_DRAIN_BYTES = 4 * 1024 * 1024
_IMAGE_FIELDS = ("file", "image")
#: The formats an upload may have: those of :data:`~dinodet.data.images.IMAGE_EXTENSIONS`.
#: PIL's others stay closed to the network (EPS, for one, would run Ghostscript).
UPLOAD_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")

logger = logging.getLogger("dinodet.serve")


class HTTPError(Exception):
    """An answer other than 200: the status and the message the client gets as
    ``{"detail": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServeStats:
    """What the server has done: requests answered (by status), images detected, model
    calls (a batch is one call) and the largest batch. ``GET /stats`` returns it."""

    requests: int = 0
    images: int = 0
    model_calls: int = 0
    largest_batch: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def answered(self, status: int) -> None:
        self.requests += 1
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "images": self.images,
                "model_calls": self.model_calls, "largest_batch": self.largest_batch,
                "statuses": dict(self.statuses)}


@dataclass
class _Job:
    """One image waiting for the model: transformed, its original (h, w), the threshold of
    its request and the future its request awaits."""

    image: Tensor
    size: tuple[int, int]
    threshold: Threshold
    future: asyncio.Future[Detections]


class Batcher:
    """Gathers the images of concurrent requests into batches for one model thread.

    :meth:`detect` queues an image and awaits its detections. The worker (:meth:`start`,
    on the event loop) takes the queue's first image, waits up to ``max_wait_ms`` for the
    batch to fill to ``max_batch``, and runs it in its thread. The model runs at threshold
    0 and each request's own threshold is applied afterwards, so requests with different
    thresholds share a batch and get what a call of the Detector at their threshold gives.
    At most ``max_queue`` images wait; more are refused (503) rather than held in memory.
    """

    def __init__(self, detector: Detector, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 64, stats: ServeStats | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0 and max_queue >= 1, got "
                             f"{max_batch}, {max_wait_ms}, {max_queue}")
        self.detector = detector
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000
        self.max_queue = int(max_queue)
        self.stats = stats or ServeStats()
        self._pending: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the worker and the model's thread (on the running event loop)."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dinodet-model")
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Stop the worker; the requests still waiting get a 503."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(HTTPError(503, "the server is shutting down"))
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    async def detect(self, image: Tensor, size: tuple[int, int],
                     threshold: Threshold) -> Detections:
        """The detections of one transformed ``image`` of original (h, w) ``size``; raises
        what the model raised on it alone, or HTTPError 503 when the queue is full."""
        if self._task is None or self._task.done():
            raise HTTPError(503, "the detection worker is not running")
        if len(self._pending) >= self.max_queue:
            raise HTTPError(503, f"the server is busy ({len(self._pending)} images waiting "
                                 "for the model); try again shortly")
        future: asyncio.Future[Detections] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(image, size, threshold, future))
        self._arrived.set()
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while len(self._pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:  # an Event, not the queue itself: a timeout can never drop an item
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            count = min(len(self._pending), self.max_batch)
            jobs = [job for job in (self._pending.popleft() for _ in range(count))
                    if not job.future.done()]  # a request that went away meanwhile
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._run, jobs)
            except Exception as e:  # no model thread (shutting down): these jobs fail
                results = [e] * len(jobs)
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, Detections):
                    job.future.set_result(result)
                else:
                    job.future.set_exception(result)

    def _run(self, jobs: Sequence[_Job]) -> list[Detections | Exception]:
        """The model on ``jobs`` as one batch (in the model's thread); where that fails,
        on each alone, so the exception goes to the image at fault only."""
        try:
            return list(self._call(jobs))
        except Exception as e:
            if len(jobs) == 1:
                return [e]
        results: list[Detections | Exception] = []
        for job in jobs:
            try:
                results += self._call([job])
            except Exception as e:
                results.append(e)
        return results

    def _call(self, jobs: Sequence[_Job]) -> list[Detections]:
        self.stats.model_calls += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        detector = self.detector
        images = ImageBatch.from_images([job.image for job in jobs])
        found = detector.detect_batch(images, [job.size for job in jobs], threshold=0.0)
        results = []
        for job, d in zip(jobs, found):
            keep = keep_above(d.scores, d.labels, job.threshold, detector.class_thresholds,
                              detector.source)
            results.append(Detections(d.boxes[keep], d.scores[keep], d.labels[keep],
                                      d.class_names, d.image_size, d.label_to_category_id))
        self.stats.images += len(jobs)
        return results


def _parse_threshold(text: str | None, default: Threshold, detector: Detector) -> Threshold:
    """The ``threshold`` of a request (None: ``default``), checked: 400 when it is no
    number in [0, 1] nor ``auto``, or ``auto`` for a model without per-class thresholds."""
    if text is None or text.strip() == "":
        return default
    text = text.strip()
    try:
        value: Any = "auto" if text == "auto" else float(text)
        threshold = check_threshold(value)
    except ValueError:
        raise HTTPError(400, f"threshold must be a number in [0, 1] or 'auto', got "
                             f"{text!r}") from None
    if threshold == "auto" and not detector.class_thresholds:
        raise HTTPError(400, str(no_thresholds_error(detector.source)))
    return threshold


def _too_large(size: int | None, limit: int) -> HTTPError:
    what = f"the request body of {size} bytes is" if size is not None else "the request body is"
    return HTTPError(413, f"{what} over the limit of {limit} bytes ({limit / 2**20:.1f} MiB; "
                          "the server's --max-request-bytes)")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes held in memory: a Content-Length over it
    is refused (413) before anything is read, a stream as soon as it passes it. A refused
    body is read on and dropped up to :data:`_DRAIN_BYTES` (see there)."""
    declared: int | None = None
    text = request.headers.get("content-length")
    if text is not None:
        try:
            declared = int(text)
        except ValueError:
            raise HTTPError(400, f"Content-Length {text!r} is not a number of bytes") from None
        if declared > limit:
            await _drain(request, limit + _DRAIN_BYTES)
            raise _too_large(declared, limit)
    parts: list[bytes] = []
    received = 0
    chunks = request.stream()
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                parts.clear()
                await _drain(request, _DRAIN_BYTES, chunks)
                raise _too_large(declared, limit)
            parts.append(chunk)
    except ClientDisconnect:
        raise HTTPError(400, "the client closed the connection before the whole body "
                             "arrived") from None
    return b"".join(parts)


async def _drain(request: Request, budget: int = _DRAIN_BYTES,
                 chunks: AsyncIterator[bytes] | None = None) -> None:
    """Read and drop the rest of a refused body (``chunks``: its stream, when begun), at
    most ``budget`` bytes; a body declared longer than that is not read at all (see
    :data:`_DRAIN_BYTES`)."""
    declared = request.headers.get("content-length", "")
    if chunks is None and declared.isdigit() and int(declared) > budget:
        return
    received = 0
    try:
        async for chunk in chunks if chunks is not None else request.stream():
            received += len(chunk)
            if received > budget:
                return
    except ClientDisconnect:
        return


async def _one_chunk(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


async def _upload(request: Request, limit: int) -> tuple[bytes, str, str | None]:
    """(image bytes, a name for messages, the form's ``threshold`` field or None) of a
    ``POST /detect``: the multipart file field ``file`` / ``image`` or the raw body."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        body = await _read_body(request, limit)
        try:
            form = await MultiPartParser(request.headers, _one_chunk(body), max_files=2,
                                         max_fields=16).parse()
        except MultiPartException as e:
            raise HTTPError(400, f"cannot read the multipart form: {e.message}") from None
        try:
            upload = next((form[k] for k in _IMAGE_FIELDS if k in form), None)
            if not isinstance(upload, UploadFile):
                fields = ", ".join(repr(k) for k in form) or "none"
                raise HTTPError(400, "the multipart form has no image file: send it as the "
                                     f"file field 'file' (or 'image'); fields given: {fields}")
            data = await upload.read()
            threshold = form.get("threshold")
            return (data, repr(upload.filename or "the upload"),
                    threshold if isinstance(threshold, str) else None)
        finally:
            await form.close()
    if media.startswith("image/") or media == "application/octet-stream":
        return await _read_body(request, limit), "the request body", None
    await _drain(request)  # read and dropped, so that the client reads the answer
    raise HTTPError(415, f"Content-Type {content_type or '(none)'!r} is not an image upload: "
                         "send a multipart/form-data form with the image as the file field "
                         "'file' (or 'image'), or the image bytes as the body with "
                         "Content-Type image/* or application/octet-stream")


def _decode(data: bytes, name: str, max_pixels: int, detector: Detector
            ) -> tuple[Tensor, tuple[int, int]]:
    """(the image as the model takes it, its upright (h, w)) from uploaded bytes, decoded
    as :func:`~dinodet.data.images.load_image` decodes a file: the header's pixel count is
    checked against ``max_pixels`` (> 0) before any pixel is decoded (413), and bytes that
    are no image or a broken one are a 400."""
    if not data:
        raise HTTPError(400, f"{name} is empty: no image bytes")
    try:
        image = decode_image(io.BytesIO(data), name, max_pixels, formats=UPLOAD_FORMATS)
    except ImageFormatError:
        raise HTTPError(400, f"{name} is not an image: {len(data)} bytes in none of the "
                             f"formats {', '.join(UPLOAD_FORMATS)}") from None
    except ImageTooLargeError as e:
        (width, height), limit = e.size, e.limit
        raise HTTPError(413, f"the image in {name} is {width}x{height} = "
                             f"{width * height / 1e6:.1f} megapixels, over the limit of "
                             f"{limit / 1e6:.1f} megapixels ({limit} pixels; the server's "
                             "--max-image-pixels)") from None
    except ImageReadError as e:
        raise HTTPError(400, f"cannot read the image in {name}: {e.__cause__}") from None
    size = (int(image.shape[1]), int(image.shape[2]))
    return detector.transform(image), size


def _to_json(found: Detections, started: float) -> dict[str, Any]:
    h, w = found.image_size
    return {
        "width": int(w), "height": int(h),
        "detections": [{"box": box, "score": score, "label": label, "class_name": name}
                       for box, score, label, name in zip(
                           found.boxes.tolist(), found.scores.tolist(),
                           found.labels.tolist(), found.names)],
        "time_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def create_app(detector: Detector, *, threshold: Threshold | None = None, max_batch: int = 8,
               max_wait_ms: float = 10.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_image_pixels: int | None = None, max_queue: int = 64,
               decode_threads: int = 4) -> FastAPI:
    """The FastAPI app serving ``detector`` (see the module's docstring).

    ``threshold``: the score a detection needs when a request gives none (None: the
    detector's own). ``max_batch`` / ``max_wait_ms``: how many queued images one model call
    takes at most, and how long the first waits for others. ``max_request_bytes``: the
    largest body read. ``max_image_pixels``: the pixel limit of an upload, by the rule of
    :func:`~dinodet.data.images.resolve_max_pixels`. ``max_queue``: images that may wait
    for the model before uploads are refused (503). ``decode_threads``: uploads decoded
    at once (each holds its decoded pixels). ``app.state.stats`` is the
    :class:`ServeStats`; the worker runs while the app's lifespan does (uvicorn's
    default)."""
    default = detector.threshold if threshold is None else check_threshold(threshold)
    if default == "auto" and not detector.class_thresholds:
        raise no_thresholds_error(detector.source)
    if max_request_bytes < 1 or decode_threads < 1:
        raise ValueError(f"need max_request_bytes >= 1 and decode_threads >= 1, got "
                         f"{max_request_bytes}, {decode_threads}")
    pixel_limit = resolve_max_pixels(max_image_pixels)
    stats = ServeStats()
    batcher = Batcher(detector, max_batch, max_wait_ms, max_queue, stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="dinodet-decode")
        app.state.decoders = decoders
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            decoders.shutdown(wait=False)

    app = FastAPI(title="dinodet", description="DINO object detection", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stats = stats
    app.state.batcher = batcher
    page = _PAGE.replace("__THRESHOLD__", json.dumps(default))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": detector.source, "classes": len(detector.class_names),
                "device": str(detector.device)}

    @app.get("/stats")
    async def get_stats() -> dict[str, Any]:
        return {**stats.to_dict(), "max_batch": batcher.max_batch,
                "max_wait_ms": batcher.max_wait * 1000, "waiting": len(batcher._pending)}

    @app.post("/detect")
    async def detect(request: Request) -> Response:
        started = time.perf_counter()
        status, content = 200, {}
        try:
            data, name, form_threshold = await _upload(request, max_request_bytes)
            chosen = _parse_threshold(form_threshold if form_threshold is not None
                                      else request.query_params.get("threshold"),
                                      default, detector)
            loop = asyncio.get_running_loop()
            image, size = await loop.run_in_executor(request.app.state.decoders, _decode,
                                                     data, name, pixel_limit, detector)
            del data
            try:
                found = await batcher.detect(image, size, chosen)
            except HTTPError:
                raise
            except Exception as e:
                logger.error("detection failed on %s", name, exc_info=e)
                reason = str(e).strip().splitlines()
                detail = f"{type(e).__name__}: {reason[0]}" if reason else type(e).__name__
                raise HTTPError(500, f"detection failed on {name}: {detail}") from None
            content = _to_json(found, started)
        except HTTPError as e:
            status, content = e.status, {"detail": e.message}
        except Exception as e:  # a bug of ours: this request's 500, never the server's end
            logger.exception("POST /detect failed")
            status, content = 500, {"detail": f"internal error: {type(e).__name__}: {e}"}
        stats.answered(status)
        return JSONResponse(content, status_code=status)

    return app


def serve(detector: Detector, host: str = "127.0.0.1", port: int = 8000, *,
          threshold: Threshold | None = None, max_batch: int = 8, max_wait_ms: float = 10.0,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          max_image_pixels: int | None = None, log_level: str = "info") -> None:
    """Serve ``detector`` on ``host``:``port`` with uvicorn until interrupted (Ctrl-C,
    SIGTERM). The options are those of :func:`create_app`."""
    import uvicorn

    app = create_app(detector, threshold=threshold, max_batch=max_batch,
                     max_wait_ms=max_wait_ms, max_request_bytes=max_request_bytes,
                     max_image_pixels=max_image_pixels)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


# The page of ``GET /``: self-contained (no build step, nothing fetched but /detect). It
# writes what it drew into #summary (data-count, data-boxes) and #list, which the tests
# read in a headless browser.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dinodet</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1000px;
         padding: 1em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .5em; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2em; text-align: center;
          cursor: pointer; }
  #drop.over { border-color: #1a73e8; background: #eef4fd; }
  #controls { margin: .7em 0; display: flex; gap: 1em; align-items: center;
              flex-wrap: wrap; }
  #status.error { color: #b00020; }
  canvas { max-width: 100%; display: block; margin-top: .5em; }
  #list { columns: 2; font-size: .9em; }
  .swatch { display: inline-block; width: .8em; height: .8em; margin-right: .3em; }
</style>
</head>
<body>
<h1>dinodet: object detection</h1>
<label id="drop">Drop an image here, or click to choose one
  <input id="file" type="file" accept="image/*" hidden>
</label>
<div id="controls">
  <label>score threshold <input id="threshold" type="range" min="0" max="1" step="0.01">
    <output id="threshold-value"></output></label>
  <span id="status">no image yet</span>
</div>
<div id="summary" data-count="" data-boxes=""></div>
<canvas id="canvas" width="0" height="0"></canvas>
<ol id="list"></ol>
<script>
"use strict";
const DEFAULT_THRESHOLD = __THRESHOLD__;
const $ = (id) => document.getElementById(id);
const slider = $("threshold"), canvas = $("canvas"), summary = $("summary");
let file = null, picture = null, timer = null, asked = 0;
slider.value = typeof DEFAULT_THRESHOLD === "number" ? DEFAULT_THRESHOLD : 0.3;
$("threshold-value").textContent = slider.value;

function colour(label) { return "hsl(" + ((label * 67) % 360) + ", 90%, 45%)"; }

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function choose(chosen) {
  if (!chosen) return;
  file = chosen;
  const url = URL.createObjectURL(chosen);
  const img = new Image();
  img.onload = () => { picture = img; detect(); };
  img.onerror = () => { picture = null; detect(); };  // the server says what is wrong
  img.src = url;
}

async function detect() {
  if (!file) return;
  const mine = ++asked;
  const body = new FormData();
  body.append("file", file, file.name || "image");
  body.append("threshold", slider.value);
  status("detecting...");
  summary.dataset.count = "";
  let answer, result;
  try {
    answer = await fetch("detect", { method: "POST", body: body });
    result = await answer.json();
  } catch (e) {
    if (mine === asked) fail("request failed: " + e);
    return;
  }
  if (mine !== asked) return;  // a newer request (another image or threshold) is on its way
  if (!answer.ok) { fail(answer.status + ": " + (result.detail || answer.statusText)); return; }
  draw(result);
}

function fail(text) {
  status(text, true);
  summary.dataset.count = "error";
  summary.dataset.boxes = "0";
  summary.textContent = "";
}

function draw(result) {
  const scale = Math.min(1, 960 / result.width);
  canvas.width = Math.round(result.width * scale);
  canvas.height = Math.round(result.height * scale);
  const ctx = canvas.getContext("2d");
  const sx = canvas.width / result.width, sy = canvas.height / result.height;
  if (picture) ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 2;
  ctx.font = "13px system-ui, sans-serif";
  ctx.textBaseline = "top";
  const list = $("list");
  list.replaceChildren();
  let boxes = 0;
  for (const d of result.detections) {
    const [x0, y0, x1, y1] = d.box;
    const text = d.class_name + " " + d.score.toFixed(2);
    ctx.strokeStyle = ctx.fillStyle = colour(d.label);
    ctx.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
    const width = ctx.measureText(text).width + 6;
    const top = Math.max(0, y0 * sy - 17);
    ctx.fillRect(x0 * sx, top, width, 17);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x0 * sx + 3, top + 2);
    boxes += 1;
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(d.label);
    item.append(swatch, text + "  [" + d.box.map((v) => v.toFixed(0)).join(", ") + "]");
    item.dataset.label = d.class_name;
    list.append(item);
  }
  const n = result.detections.length;
  summary.textContent = n + " detection" + (n === 1 ? "" : "s") + " on " + result.width +
    "x" + result.height + " in " + result.time_ms.toFixed(0) + " ms";
  summary.dataset.boxes = String(boxes);
  summary.dataset.count = String(n);
  status("done");
}

$("file").addEventListener("change", (e) => choose(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files[0]);
});
slider.addEventListener("input", () => {
  $("threshold-value").textContent = slider.value;
  clearTimeout(timer);
  timer = setTimeout(detect, 200);
});
</script>
</body>
</html>
"""
