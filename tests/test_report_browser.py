"""The `embedkit report` page opened in headless Chromium (Debian's `chromium`), driven over the DevTools
protocol on a pipe: it renders with no console errors, every image loads, text from the data (labels,
subgroup values, a model folder's name) shows as text and never as markup, and it reads on a 390 px phone."""

from __future__ import annotations

import base64
import csv
import json
import os
import select
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import make_image, make_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium (.ci/run does)")

# Text a clinic's data could hold; unescaped, each would become markup (and the images would fail to load
# or a dialog would open).
HOSTILE_LABELS = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", 'a&b "quoted"']
HOSTILE_SITES = ["<b>north</b>", "<iframe src=javascript:alert(3)>"]
HOSTILE_FOLDER = "clip<svg onload=alert(4)>"


class DevTools:
    """A headless Chromium and a DevTools protocol session over --remote-debugging-pipe (fds 3 and 4)."""

    def __init__(self, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire():  # in the child, before exec: the browser reads fd 3 and writes fd 4
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--no-default-browser-check", "--allow-file-access-from-files", f"--user-data-dir={profile}",
             "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, match, timeout: float = 30) -> dict:
        for m in self.events:  # an event may have arrived while waiting for something else
            if match(m):
                self.events.remove(m)
                return m
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                m = json.loads(raw)
                if match(m):
                    return m
                self.events.append(m)
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium exited")
            self._buf += chunk

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


def open_page(dt: DevTools, url: str, width: int, height: int, mobile: bool) -> tuple[str, dict]:
    target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        dt.send(f"{domain}.enable", session=session)
    dt.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                   "mobile": mobile}, session=session)
    dt.send("Page.navigate", {"url": url}, session=session)
    while True:  # a dialog (alert) blocks loading: record it, close it, go on
        m = dt.wait(lambda m: m.get("sessionId") == session and m.get("method") in (
            "Page.loadEventFired", "Page.javascriptDialogOpening"))
        if m["method"] == "Page.loadEventFired":
            break
        dt.events.append(m)
        try:
            dt.send("Page.handleJavaScriptDialog", {"accept": True}, session=session)
        except RuntimeError:  # headless may have closed it already
            pass
    time.sleep(0.3)  # let late console messages arrive
    return session, {}


def evaluate(dt: DevTools, session: str, expression: str):
    r = dt.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    return r["result"].get("value")


def problems(dt: DevTools, session: str) -> list[str]:
    """Console errors, uncaught exceptions, failed loads (Log errors) and dialogs seen on this page."""
    found = []
    for m in list(dt.events):
        if m.get("sessionId") != session:
            continue
        method, p = m.get("method"), m.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            found.append(f"console.{p['type']}: {p.get('args')}")
        elif method == "Runtime.exceptionThrown":
            found.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            found.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Page.javascriptDialogOpening":
            found.append(f"dialog: {p.get('message')}")
    return found


def screenshot(dt: DevTools, session: str, path: Path) -> tuple[int, int]:
    data = base64.b64decode(dt.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
    path.write_bytes(data)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@pytest.fixture(scope="module")
def hostile_report(tiny_models, tmp_path_factory):
    """A real extract with the tiny CLIP (copied to a folder whose name is markup) and a trained model whose
    labels and subgroup values are markup too; then `embedkit report`."""
    from embedkit.extract import ExtractConfig, extract
    from embedkit.items import SourceOptions
    from embedkit.report import build_report
    from embedkit.train import TrainConfig, train

    root = tmp_path_factory.mktemp("browser")
    clip = root / HOSTILE_FOLDER
    shutil.copytree(tiny_models["clip"], clip)
    data = root / "data"
    data.mkdir()
    rows = []
    for i in range(45):
        make_image(data / f"c{i}.png", i, size=(36, 36))
        rows.append({"id": f"c{i:03d}", "image": f"c{i}.png", "report": make_report(i, 5),
                     "dx": HOSTILE_LABELS[i % 3], "site": HOSTILE_SITES[i % 2]})
    with open(data / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    src = SourceOptions(metadata=data / "meta.csv", id_col="id", image_col="image", text_col="report",
                        label_cols=["dx"])
    extract(data, root / "emb", ExtractConfig(image_model=str(clip), text_model=str(clip), progress=False), source=src)
    model = root / "model"
    train(root / "emb", model, TrainConfig(labels=["dx"], fusion="early", epochs=3, bootstrap=50,
                                           subgroups=["site"], align="center"))
    return build_report(model)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    dt = DevTools(tmp_path_factory.mktemp("chromium-profile"))
    yield dt
    dt.close()


def test_report_renders_cleanly_with_every_image_and_escaped_text(hostile_report, browser, tmp_path):
    page = hostile_report.read_text()
    session, _ = open_page(browser, hostile_report.as_uri(), 1280, 900, mobile=False)
    assert problems(browser, session) == []
    images = evaluate(browser, session, "JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth]))")
    images = json.loads(images)
    assert len(images) == page.count("<img ") >= 3  # confusion matrix, reliability, learning curve, ...
    assert all(done and width > 0 for done, width in images), images
    counts = json.loads(evaluate(browser, session, "JSON.stringify({scripts: document.scripts.length, "
                                                   "svg: document.querySelectorAll('svg').length, "
                                                   "iframes: document.querySelectorAll('iframe').length, "
                                                   "bold: document.querySelectorAll('b').length, "
                                                   "x: document.querySelectorAll('img[src=x]').length})"))
    assert counts == {"scripts": 0, "svg": 0, "iframes": 0, "bold": 0, "x": 0}
    text = evaluate(browser, session, "document.body.innerText")
    for value in [*HOSTILE_LABELS, *HOSTILE_SITES, HOSTILE_FOLDER]:
        assert value in text, value  # shown to the reader as the data says, character for character
    w, h = screenshot(browser, session, tmp_path / "report-desktop.png")
    assert (w, h) == (1280, 900)


def test_report_reads_on_a_phone(hostile_report, browser, tmp_path):
    session, _ = open_page(browser, hostile_report.as_uri(), 390, 844, mobile=True)
    assert problems(browser, session) == []
    layout = json.loads(evaluate(browser, session, """JSON.stringify({
        page: document.documentElement.scrollWidth, viewport: window.innerWidth,
        font: parseFloat(getComputedStyle(document.body).fontSize),
        widest: Math.max(...[...document.querySelectorAll('body > *')].map(e => e.getBoundingClientRect().right)),
        images: Math.max(...[...document.images].map(i => i.getBoundingClientRect().width))})"""))
    assert layout["viewport"] == 390  # the viewport tag: not a 980 px desktop layout shrunk to fit
    assert layout["page"] <= 390 and layout["widest"] <= 390, layout  # nothing makes the page scroll sideways
    assert layout["images"] <= 390 and layout["font"] >= 14, layout
    w, h = screenshot(browser, session, tmp_path / "report-390.png")
    assert w == 390
