"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: open a page, evaluate JavaScript in it
or in its frames. Host names other than 127.0.0.1 do not resolve, so a page that needs the network shows it."""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

NO_NETWORK = "MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"


class Chromium:
    def __init__(self, profile: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise RuntimeError("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--host-resolver-rules={NO_NETWORK}", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--disable-features=IsolateSandboxedIframes", "--disable-site-isolation-trials",  # frames in the page's tree
             "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        for line in self.proc.stderr:
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
                break
            if time.time() > deadline:
                break
        else:
            raise RuntimeError(f"chromium exited ({self.proc.poll()}) before its DevTools endpoint was up")
        self._ids = itertools.count(1)

    def open(self, url: str) -> Page:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=30) as r:
            target = json.load(r)
        page = Page(connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30), self._ids)
        page.call("Page.navigate", url=url)  # the whole URL, fragment (MLflow's UI routes) included
        return page

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Page:
    def __init__(self, ws, ids):
        self.ws, self.ids = ws, ids

    def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr: str, context: int | None = None):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True,
                      **({"contextId": context} if context else {}))
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def frames(self) -> list[dict]:
        """Every frame under the page's main frame (id, url)."""
        out, todo = [], [self.call("Page.getFrameTree")["frameTree"]]
        while todo:
            node = todo.pop()
            out.append(node["frame"])
            todo += node.get("childFrames", [])
        return out[1:]

    def context(self, frame_id: str) -> int:
        """An execution context in a frame (also a sandboxed one), for eval(context=...)."""
        return self.call("Page.createIsolatedWorld", frameId=frame_id, worldName="medssl-test")["executionContextId"]

    def wait(self, expr: str, timeout: float = 60, context: int | None = None):
        """Poll `expr` until it is truthy; its last value."""
        deadline, value = time.time() + timeout, None
        while time.time() < deadline:
            try:
                value = self.eval(expr, context)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"{expr!r} not true within {timeout}s (last {value!r})")

    def screenshot(self, path: Path) -> Path:
        """The viewport as a PNG at `path`."""
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def type_into(self, selector: str, text: str) -> None:
        """Set a React-controlled <input>'s value as typing would (its own setter, then an input event)."""
        self.eval(f"(() => {{ const i = document.querySelector({json.dumps(selector)}); "
                  "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, "
                  f"{json.dumps(text)}); i.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")

    def close(self) -> None:
        self.ws.close()


# Once the document is fully parsed (a large page of data-URI images is read in chunks, so before that
# document.images holds only the first few), every <img> finished loading with pixels: (number, number broken).
IMAGES = ("(() => { if (document.readyState !== 'complete') return null;"
          " const im = Array.from(document.images); if (!im.length || im.some(i => !i.complete)) return null;"
          " return [im.length, im.filter(i => i.naturalWidth === 0).length]; })()")

# MLflow's UI (3.17), as `medssl pipeline`'s links open it. Shared by tests/test_pipeline_e2e.py, which asserts on
# what these return, and tests/screenshots.py, which retakes docs/img's screenshots from a finished project.
CLOSE_ASSISTANT = "document.querySelectorAll('button[aria-label=Close]').forEach(b => b.click())"  # a third of the window
EXPANDER = 'button[data-component-id$="runnamecellrenderer.tsx_46"]'  # the + beside the pipeline run
SEARCH = 'input[placeholder="Search metric charts"]'


def toggle_pipeline_run(page) -> None:
    """Open (or close) the newest top-level run's nested runs: its + in the runs table, once it is drawn."""
    page.wait(f"document.querySelector('{EXPANDER}') !== null")
    page.eval(f"document.querySelector('{EXPANDER}').click()")


def experiment_page(chromium: Chromium, links: dict, shot: Path | None = None, expand: bool = False) -> str:
    """The experiment's runs table under its description (links from `medssl.tracking.ui_links`); the page's text.
    expand: with the newest top-level run's nested runs open (its +) in the shot and the text."""
    page = chromium.open(links["experiment"])
    page.wait("document.body.innerText.includes('its description is the verdict')")
    page.wait("document.body.innerText.includes('pipeline-') && document.body.innerText.includes('Run Name')")
    page.eval(CLOSE_ASSISTANT)
    if expand:
        toggle_pipeline_run(page)
        page.wait("/\\bssl-[a-z]/.test(document.body.innerText)")  # a nested run's row (not medssl-…)
    if shot:
        time.sleep(1)
        page.screenshot(shot)
    text = page.eval("document.body.innerText")
    if expand:  # MLflow keeps the row open for the next page (init_charts opens it with the same +): close it again
        toggle_pipeline_run(page)
        page.wait("!/\\bssl-[a-z]/.test(document.body.innerText)")
    return text


def init_charts(chromium: Chromium, links: dict, keys: list[str], inits: list[str], shot: Path | None = None) -> dict:
    """The chart view of the grid-<init> runs: for each metric key, the inits with no bar in its chart
    ({} when every init has one). Charts off screen are not drawn, so one key is searched at a time; the search box
    is retyped every 15 s, as it may miss a value typed while the page settles. The shot shows every
    test_balanced_accuracy_* chart."""
    chart = chromium.open(links["compare"])
    toggle_pipeline_run(chart)
    chart.wait(f"document.querySelector('{SEARCH}') !== null")
    missing = {}
    for key in keys:
        for attempt in range(60):
            if attempt % 15 == 0:
                chart.type_into(SEARCH, key)
            time.sleep(1)
            text = chart.eval("document.body.innerText")
            at = text.find(key + "\n")
            bars = text[at:at + 2000].split("test_balanced_accuracy_")[1] if at >= 0 else ""
            missing[key] = [i for i in inits if not re.search(rf"(?m)^\s*{re.escape(i)}\s*$", bars)]  # a legend line
            if not missing[key]:
                del missing[key]
                break
    if shot:
        chart.type_into(SEARCH, "test_balanced_accuracy_")
        chart.eval(CLOSE_ASSISTANT)
        time.sleep(2)
        chart.screenshot(shot)
    return missing


def run_charts(chromium: Chromium, base: str, run, shot: Path | None = None) -> str:
    """A run's page, tab *Model metrics* (its charts, one section per metric prefix, system metrics apart): the
    page's text once its charts are drawn (a run without charts times out: "No charts" shows before they load)."""
    page = chromium.open(f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                         "/model-metrics?workflowType=machine_learning")
    page.wait("document.querySelectorAll('canvas, svg.main-svg').length > 0")
    page.eval(CLOSE_ASSISTANT)
    time.sleep(2)
    if shot:
        page.screenshot(shot)
    return page.eval("document.body.innerText")


def chart_sections(text: str) -> dict[str, int]:
    """The chart sections of a run_charts page's text and their chart counts: {"train": 3, "val": 4, ...}."""
    return {name: int(n) for name, n in re.findall(r"\n(\S+)\n\((\d+)\)\nAdd chart", text)}


def report_in_artifact_viewer(chromium: Chromium, base: str, run) -> tuple[Page, int]:
    """The parent run's reports/report.html in MLflow's sandboxed HTML viewer: the page and the report frame's
    context, for eval(context=...)."""
    ui = chromium.open(f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                       "/artifacts/reports/report.html?workflowType=machine_learning")
    ui.wait("document.querySelector('iframe.mlflow-html-iframe') !== null")
    deadline = time.time() + 30
    while not ui.frames() and time.time() < deadline:
        time.sleep(0.5)
    return ui, ui.context(ui.frames()[0]["id"])


def open_paired_differences(ui: Page, frame: int, shot: Path | None = None) -> int:
    """Follow the report's link to the paired differences (a relative link is blocked in the viewer, so the table
    is in the page); the number of its rows, header included."""
    ui.eval("document.querySelector('a[href=\"#paired_differences.csv\"]').click()", frame)
    ui.wait("document.getElementById('paired_differences.csv').open", context=frame)
    rows = ui.eval("document.getElementById('paired_differences.csv').querySelectorAll('tr').length", frame)
    if shot:
        ui.eval(CLOSE_ASSISTANT)
        time.sleep(1)
        ui.screenshot(shot)
    return rows
