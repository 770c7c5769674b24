"""actors/serve/static/index.html (the serving side's web page) in headless Chromium (Debian's package; no browser download).

The page is served by a small stand-in for the endpoint (stdlib HTTP server on 127.0.0.1)
that speaks the two OpenAI routes the page uses — GET /v1/models and a streamed POST
/v1/chat/completions — and records what the page sent. Chromium is driven over the Chrome
DevTools protocol (websockets): pick the model, choose an image file, ask, watch the
streamed answer arrive, see the answer's boxes (its finish chunk's ``delta.boxes``) drawn over
the image with their phrases, take a screenshot. The real endpoint serving this page at "/" is
checked by tests/pipelines/demo/test_demo.py.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGE = Path(__file__).resolve().parents[3] / "actors" / "serve" / "static" / "index.html"
PIECES = ["The ", "shapes ", "are ", "red"]
# pixels of the 96×48 image, as the endpoint sends them (docs/interfaces.md "Boxes in answers")
BOXES = [{"phrase": "the red square", "boxes": [[24, 12, 72, 36]]}, {"phrase": None, "boxes": [[60, 30, 90, 45]]},
         {"phrase": "upside down", "boxes": [[90, 40, 80, 10]]}]  # as a model may write it: drawn corner to corner

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium (apt-get install -y chromium) at /usr/bin/chromium",
)


class _FakeEndpoint(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/":
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/v1/models":
            data = {"object": "list", "data": [{"id": "sphinx-x-demo", "object": "model"},
                                               {"id": "sphinx-x-other", "object": "model"}]}
            self._send(200, json.dumps(data).encode(), "application/json")
        else:
            self._send(404, b'{"error": {"message": "not found"}}', "application/json")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in PIECES:  # stream slowly enough that the page renders partial answers
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.05)
        finish = {"object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": {"boxes": BOXES}, "finish_reason": "stop"}]}
        self.wfile.write(f"data: {json.dumps(finish)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def endpoint():
    _FakeEndpoint.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _Chromium:
    """Headless Chromium with a DevTools websocket to its one page."""

    def __init__(self, url: str, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--window-size=900,700", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            pages = [t for t in targets if t["type"] == "page"]
            if pages or time.time() > deadline:
                break
            time.sleep(0.1)
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=2**26))
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr: str):
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expr)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expr}")

    def close(self):
        if getattr(self, "_stack", None):
            self._stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_pick_image_ask_and_watch_the_answer_stream(endpoint, tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (96, 48), (220, 30, 30)).save(image)
    browser = _Chromium(endpoint + "/", tmp_path / "profile")
    try:
        browser.wait_for("!!document.getElementById('send')")
        # the model picker is filled from /v1/models
        assert browser.wait_for("[...document.querySelectorAll('#model option')].map(o => o.value).join(',')") \
            == "sphinx-x-demo,sphinx-x-other"
        browser.js("document.getElementById('model').value = 'sphinx-x-other'")
        # choose the image file as a user would; the page turns it into a data: URL preview
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
        browser.call("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
        browser.wait_for("document.getElementById('preview').src.startsWith('data:image/png;base64,')")
        browser.js("document.getElementById('question').value = 'What colour are the shapes?'")
        browser.js("document.getElementById('send').click()")
        # streaming: a partial answer shows before the whole one
        partial = browser.wait_for("(t => t && t !== 'The shapes are red' && t)(document.getElementById('answer').textContent)")
        assert "The shapes are red".startswith(partial)
        browser.wait_for("document.getElementById('status').textContent.startsWith('done')")
        assert browser.js("document.getElementById('answer').textContent") == "The shapes are red"
        # the boxes, over the image at its pixels (shown at its natural 96×48), labelled and listed
        placed = browser.js("(i => [...document.querySelectorAll('#stage .box')].map(b => { const r = "
                            "b.getBoundingClientRect(); return [r.left - i.left, r.top - i.top, r.width, r.height, "
                            "b.textContent]; }))(document.getElementById('preview').getBoundingClientRect())")
        assert placed == [[24, 12, 48, 24, "the red square"], [60, 30, 30, 15, ""], [80, 10, 10, 30, "upside down"]]
        assert browser.js("[...document.querySelectorAll('#boxes li')].map(li => li.textContent)") == [
            "the red square: 24, 12, 72, 36", "60, 30, 90, 45", "upside down: 80, 10, 90, 40"]
        left, top = browser.js("(r => [r.left, r.top])(document.getElementById('preview').getBoundingClientRect())")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()

    drawn = Image.open(io.BytesIO(shot)).convert("RGB")
    at = lambda x, y: drawn.getpixel((int(left + x), int(top + y)))  # noqa: E731 - a CSS pixel of the image
    assert at(25, 24) == (255, 0, 0) and at(61, 38) == (0, 0, 255)    # the boxes' 2 px borders
    assert at(48, 24) == (220, 30, 30) and at(10, 40) == (220, 30, 30)  # inside and outside: the image

    (tmp_path / "page.png").write_bytes(shot)
    img = Image.open(io.BytesIO(shot)).convert("L")
    assert img.size[0] >= 800 and sum(1 for n in img.histogram() if n) > 10  # a rendered page, not a blank
    (req,) = _FakeEndpoint.requests
    assert req["model"] == "sphinx-x-other" and req["stream"] is True
    (msg,) = req["messages"]
    parts = {p["type"]: p for p in msg["content"]}
    assert parts["text"]["text"] == "What colour are the shapes?"
    url = parts["image_url"]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (96, 48) and sent.convert("RGB").getpixel((5, 5)) == (220, 30, 30)


def test_page_reports_an_endpoint_error(tmp_path):
    """With no /v1/models behind it, the page says so instead of failing silently."""
    class _Empty(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = PAGE.read_bytes() if self.path == "/" else b'{"error": {"message": "no such route"}}'
            self.send_response(200 if self.path == "/" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Empty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = _Chromium(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "profile")
    try:
        status = browser.wait_for("(e => e && e.textContent)(document.getElementById('status'))")
        assert "could not list models: no such route" in status
        assert browser.js("document.getElementById('status').className") == "error"
    finally:
        browser.close()
        server.shutdown()
        server.server_close()


def test_page_asks_for_a_key_and_sends_it_as_bearer(tmp_path):
    """Keys on: /v1/models answers 401 without one; the page asks, keeps the key in
    sessionStorage and sends ``Authorization: Bearer <key>`` with JSON posts."""
    seen: list[dict] = []

    class _Keyed(_FakeEndpoint):
        def _authorised(self) -> bool:
            if self.headers.get("Authorization") == "Bearer sk-page":
                return True
            body = b'{"error": {"message": "invalid or missing API key", "type": "authentication_error"}}'
            self._send(401, body, "application/json")
            return False

        def do_GET(self):
            if self.path == "/" or self._authorised():
                super().do_GET()

        def do_POST(self):
            seen.append({"auth": self.headers.get("Authorization"), "type": self.headers.get("Content-Type")})
            if self._authorised():
                super().do_POST()

    _FakeEndpoint.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Keyed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = _Chromium(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "profile")
    try:
        status = browser.wait_for("(e => e && e.textContent)(document.getElementById('status'))")
        assert "needs an API key" in status
        assert browser.js("document.activeElement.id") == "apikey"
        browser.js("(k => { k.value = 'sk-page'; k.dispatchEvent(new Event('change')); })"
                   "(document.getElementById('apikey'))")
        assert browser.wait_for("[...document.querySelectorAll('#model option')].map(o => o.value).join(',')") \
            == "sphinx-x-demo,sphinx-x-other"
        assert browser.js("sessionStorage.getItem('sphinx-x-api-key')") == "sk-page"
        assert browser.js("localStorage.length") == 0
        browser.js("document.getElementById('send').click()")
        browser.wait_for("document.getElementById('status').textContent.startsWith('done')")
        assert browser.js("document.getElementById('answer').textContent") == "The shapes are red"
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
    assert seen == [{"auth": "Bearer sk-page", "type": "application/json"}]
