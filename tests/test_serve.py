"""`dinodet serve` over real HTTP on localhost: the detections equal the Detector's, bad
uploads get a 4xx and leave the server healthy, a model failure is one request's 500,
concurrent clients share batched model calls, and the page draws boxes in a headless
Chromium (skipped where none is installed)."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
import uvicorn

from dinodet.cli import build_parser, main
from dinodet.predict import Detector
from dinodet.serve import create_app
from tiny_models import save_tiny_model

CLASSES = [{"label": 0, "category_id": 1, "name": "cat"},
           {"label": 1, "category_id": 3, "name": "dog"},
           {"label": 2, "category_id": 7, "name": "bird"}]
LIMIT_BYTES = 256 * 1024  # the test server's --max-request-bytes
LIMIT_PIXELS = 500_000  # and --max-image-pixels


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"), CLASSES)


@pytest.fixture(scope="module")
def det(model_dir) -> Detector:
    return Detector.from_pretrained(model_dir)


def _png(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4:h // 2, w // 4:w // 2] = (250, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class LiveServer:
    """uvicorn serving ``app`` in a thread on a free port of 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "no start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            kind = response.getheader("content-type", "")
            return response.status, json.loads(data) if "json" in kind else data.decode()
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(det) -> Iterator[LiveServer]:
    live = LiveServer(create_app(det, threshold=0.0, max_batch=8, max_wait_ms=20,
                                 max_request_bytes=LIMIT_BYTES,
                                 max_image_pixels=LIMIT_PIXELS))
    yield live
    live.stop()


def _multipart(fields: dict[str, tuple[str | None, bytes, str | None]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart form: name -> (filename, data, content type)."""
    boundary = "dinodet-test-boundary-7f3a"
    out = b""
    for name, (filename, data, kind) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"'
                                                      if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if kind:
            out += f"Content-Type: {kind}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _expected(det: Detector, png: bytes, tmp_path: Path, threshold: float) -> list[dict]:
    path = tmp_path / "expected.png"
    path.write_bytes(png)
    found = det(path, threshold=threshold)
    return [{"box": b, "score": s, "label": lab, "class_name": n} for b, s, lab, n in zip(
        found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), found.names)]


def _same(got: list[dict], want: list[dict]) -> None:
    assert [d["label"] for d in got] == [d["label"] for d in want]
    assert [d["class_name"] for d in got] == [d["class_name"] for d in want]
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose([d["box"] for d in got], [d["box"] for d in want],
                               atol=1e-3, rtol=0)


def test_detections_equal_the_detectors_in_every_upload_form(server, det, tmp_path):
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["classes"] == 3
    png = _png(60, 90)
    want = _expected(det, png, tmp_path, 0.0)
    assert len(want) == 20  # num_select at threshold 0
    status, raw = server.request("POST", "/detect", png, {"Content-Type": "image/png"})
    assert status == 200, raw
    assert (raw["width"], raw["height"]) == (90, 60) and raw["time_ms"] >= 0
    _same(raw["detections"], want)
    # multipart, field "file" or "image", the threshold in the form or the query
    threshold = want[5]["score"]
    high = _expected(det, png, tmp_path, threshold)
    assert 5 <= len(high) < len(want)
    for field, query, form in (("file", "", {}), ("image", f"?threshold={threshold!r}", {}),
                               ("file", "", {"threshold": (None, repr(threshold).encode(),
                                                           None)})):
        body, kind = _multipart({field: ("pic.png", png, "image/png"), **form})
        status, got = server.request("POST", "/detect" + query, body, {"Content-Type": kind})
        assert status == 200, got
        _same(got["detections"], want if not (query or form) else high)
    status, got = server.request("POST", "/detect?threshold=0.5", png,
                                 {"Content-Type": "application/octet-stream"})
    assert status == 200 and all(d["score"] >= 0.5 for d in got["detections"])


def test_bad_uploads_are_4xx_and_the_server_stays_healthy(server):
    png = _png(40, 50)
    as_png = {"Content-Type": "image/png"}
    form, form_type = _multipart({"other": ("x.png", png, "image/png")})
    cases = [  # (body, headers, query, status, words of the message)
        (b"hello, I am not an image", as_png, "", 400, "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", as_png, "", 400,
         "not an image"),  # PIL reads EPS, with Ghostscript: not from the network
        (png[: len(png) // 2], as_png, "", 400, "cannot read the image"),
        (b"", as_png, "", 400, "empty"),
        (png, {"Content-Type": "text/plain"}, "", 415, "Content-Type"),
        (png, {}, "", 415, "Content-Type"),
        (png, as_png, "?threshold=2", 400, "threshold"),
        (png, as_png, "?threshold=auto", 400, "per-class"),
        (_big_pixels(), as_png, "", 413, "megapixels"),
        (b"\0" * (LIMIT_BYTES + 1000), as_png, "", 413, "bytes"),
        (form, {"Content-Type": form_type}, "", 400, "no image file"),
    ]
    for body, headers, query, want, words in cases:
        status, got = server.request("POST", "/detect" + query, body, headers)
        assert status == want and words in got["detail"], (status, got)
    # a declared Content-Length over the limit: refused before the body is sent at all
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/detect")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(100 * LIMIT_BYTES))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "100 times" not in response.read().decode()
    conn.close()
    # a chunked stream without Content-Length: refused once it passes the limit
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"\x89PNG" + b"\0" * 8192 for _ in range(LIMIT_BYTES // 8192 + 8))
    conn.request("POST", "/detect", body=chunks, headers={"Content-Type": "image/png"},
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["detail"]
    conn.close()
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, got = server.request("POST", "/detect", png, {"Content-Type": "image/png"})
    assert status == 200 and got["detections"]


def _big_pixels() -> bytes:
    """A PNG of few bytes and more pixels than the test server allows."""
    buf = io.BytesIO()
    Image.new("RGB", (1000, 600)).save(buf, format="PNG")
    assert len(buf.getvalue()) < LIMIT_BYTES
    return buf.getvalue()


def test_a_model_failure_is_that_requests_500_only(det):
    """One poisoned image in a batch: its request gets a 500, the others their detections."""
    broken = Detector(det.model, CLASSES, det.transform, threshold=0.0)
    real = broken.detect_batch

    def detect_batch(images, sizes, threshold=None):
        if any(w == 77 for _, w in sizes):
            raise RuntimeError("poisoned image\nsecond line")
        return real(images, sizes, threshold)

    broken.detect_batch = detect_batch  # type: ignore[method-assign]
    live = LiveServer(create_app(broken, max_batch=4, max_wait_ms=2000))  # waits for all 4
    try:
        results: dict[int, tuple[int, Any]] = {}

        def send(i: int) -> None:
            results[i] = live.request("POST", "/detect", _png(40, 77 if i == 1 else 60),
                                      {"Content-Type": "image/png"})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results[1][0] == 500 and "poisoned image" in results[1][1]["detail"]
        assert all(results[i][0] == 200 and results[i][1]["detections"] for i in (0, 2, 3))
        stats = live.request("GET", "/stats")[1]
        assert stats["largest_batch"] > 1  # they were batched, then run one by one
        assert stats["statuses"] == {"200": 3, "500": 1}
        assert live.request("GET", "/health")[0] == 200
    finally:
        live.stop()


def test_load_from_8_concurrent_clients_is_batched(server, capsys):
    images = [_png(48, 64, seed) for seed in range(3)]
    before = server.request("GET", "/stats")[1]
    per_client, clients = 40, 8
    latencies: list[float] = []
    failures: list[Any] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            for i in range(per_client):
                start = time.perf_counter()
                conn.request("POST", "/detect", body=images[(k + i) % 3],
                             headers={"Content-Type": "image/png"})
                response = conn.getresponse()
                data = json.loads(response.read())
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if response.status != 200 or len(data["detections"]) != 20:
                        failures.append((response.status, data))
        except Exception as e:  # a dropped connection is a failure too
            with lock:
                failures.append(repr(e))
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    seconds = time.perf_counter() - start
    assert not failures, failures[:3]
    assert len(latencies) == per_client * clients
    after = server.request("GET", "/stats")[1]
    calls = after["model_calls"] - before["model_calls"]
    images_done = after["images"] - before["images"]
    q = statistics.quantiles(latencies, n=100)
    with capsys.disabled():
        print(f"\nload: {len(latencies)} requests from {clients} clients in {seconds:.1f} s; "
              f"latency p50 {q[49] * 1000:.0f} ms, p90 {q[89] * 1000:.0f} ms, p99 "
              f"{q[98] * 1000:.0f} ms; {calls} model calls ({images_done / calls:.1f} "
              f"images each, largest batch {after['largest_batch']})")
    assert images_done == len(latencies)
    assert calls < len(latencies) / 2  # batched: 8 clients give several images a call
    assert server.request("GET", "/health")[0] == 200


def test_page_draws_the_boxes_in_a_headless_browser(server, det, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (browser and driver_path):
        pytest.skip("no chromium/chromedriver on this machine: apt-get install chromium "
                    "chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed: pip install selenium")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status, page = server.request("GET", "/")
    assert status == 200 and "<canvas" in page and "://" not in page  # nothing fetched
    png = _png(60, 90, 5)
    picture = tmp_path / "drop me.png"
    picture.write_bytes(png)
    want = _expected(det, png, tmp_path, 0.0)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        driver.find_element(By.ID, "file").send_keys(str(picture))
        summary = driver.find_element(By.ID, "summary")
        WebDriverWait(driver, 30).until(lambda _: summary.get_attribute("data-count"))
        assert summary.get_attribute("data-count") == str(len(want)) == "20", summary.text
        assert summary.get_attribute("data-boxes") == "20"
        labels = [li.get_attribute("data-label")
                  for li in driver.find_elements(By.CSS_SELECTOR, "#list li")]
        assert labels == [d["class_name"] for d in want]
        size = driver.execute_script("const c = document.getElementById('canvas');"
                                     "return [c.width, c.height];")
        assert size == [90, 60]
        # the threshold slider asks again: fewer boxes
        driver.execute_script("const s = document.getElementById('threshold');"
                              f"s.value = {want[4]['score']};"
                              "s.dispatchEvent(new Event('input'));")
        WebDriverWait(driver, 30).until(
            lambda _: summary.get_attribute("data-count") not in ("", "20"))
        assert 5 <= int(summary.get_attribute("data-count")) < 20
        # a file that is no image: the page shows the server's message
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not an image at all")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(driver, 30).until(lambda _: summary.get_attribute("data-count") == "error")
        assert "400" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


def test_cli_serve_loads_the_model_and_passes_the_options(model_dir, monkeypatch, capsys):
    import dinodet.serve

    seen: dict[str, Any] = {}

    def fake_serve(detector, host, port, **options):
        seen.update(detector=detector, host=host, port=port, **options)

    monkeypatch.setattr(dinodet.serve, "serve", fake_serve)
    assert main(["serve", str(model_dir), "--port", "0", "--max-batch", "3",
                 "--max-wait-ms", "5", "--max-request-bytes", "1000", "--max-image-pixels",
                 "0", "--threshold", "0.4"]) == 0
    assert isinstance(seen["detector"], Detector) and seen["detector"].class_names == [
        "cat", "dog", "bird"]
    assert (seen["host"], seen["port"], seen["max_batch"], seen["max_wait_ms"],
            seen["max_request_bytes"], seen["max_image_pixels"], seen["threshold"]) == (
        "127.0.0.1", 0, 3, 5, 1000, 0, 0.4)
    assert "http://127.0.0.1:0/" in capsys.readouterr().err
    defaults = build_parser().parse_args(["serve", "m"])
    assert (defaults.host, defaults.port, defaults.max_batch,
            defaults.max_request_bytes) == ("127.0.0.1", 8000, 8, 20 * 1024 * 1024)
    assert main(["serve", str(model_dir), "--device", "nonsense"]) == 2
    assert "--device 'nonsense'" in capsys.readouterr().err


def test_cli_serve_resizes_and_runs_int8_as_predict_does(model_dir, monkeypatch, capsys):
    import dinodet.serve
    from dinodet.model.quantize import int8_counts

    seen: dict[str, Any] = {}
    monkeypatch.setattr(dinodet.serve, "serve",
                        lambda detector, host, port, **options: seen.update(detector=detector))
    assert main(["serve", str(model_dir), "--size", "320", "--max-size", "480",
                 "--int8"]) == 0
    detector = seen["detector"]
    assert (detector.transform.size, detector.transform.max_limit) == (320, 480)
    counts = int8_counts(detector.model)
    assert detector.int8 and counts.int8 > 0 and counts.convs > 0, counts
    err = capsys.readouterr().err
    assert "int8, 320 px shorter side up to 480" in err
    assert "--int8:" in err and "approximate" in err
    assert "a batch's images share the activations' scale (--max-batch 1: none do)" in err
    assert main(["serve", str(model_dir), "--size", "600", "--max-size", "500"]) == 2
    assert "--max-size 500 is smaller than --size 600" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--int8", "--device", "meta"]) == 2
    assert "--int8 runs on the CPU only, not --device meta" in capsys.readouterr().err
