"""Reports, exported notebooks and JupyterLab in a real headless Chromium (Debian's package).

Playwright drives ``/usr/bin/chromium`` (its own browser downloads cannot work offline) with a
fresh profile. Bokeh draws inside shadow roots: Playwright locators pierce them. Screenshots go
to ``$FACTSCOPE_SCREENSHOTS`` (default: the test's tmp dir).
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from notebook_runs import ROOT, executed, kernel_env
from test_report import make_report, run_tiny_report
from test_text import HOSTILE

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = [
    pytest.mark.browser,
    # on a laptop without Debian's chromium these tests skip; in CI (CI=true) they must run
    pytest.mark.skipif(not Path(CHROMIUM).exists() and os.environ.get("CI") != "true",
                       reason="needs Debian's chromium (.ci/browser-setup.sh)"),
]
if os.environ.get("CI") == "true":
    from playwright import sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        yield b
        b.close()


def shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("FACTSCOPE_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


class Watched:
    """A page in a fresh context that records console errors and requests."""

    def __init__(self, browser, width=1500, height=1000):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def external(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(("file://", "data:", "blob:"))]

    def close(self):
        self.context.close()


def non_empty(png: bytes) -> bool:
    """A screenshot shows something: several colours, and not all near-white."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 16) or [(0, (0, 0, 0))] * 1000
    dark = sum(n for n, c in colours if sum(c) < 600)
    return len(colours) > 8 and dark > 0.002 * img.width * img.height


def assert_plots_render(page, expected: int) -> None:
    figures = page.locator(".bk-Figure")
    figures.first.wait_for(state="visible")
    assert figures.count() == expected
    for i in range(expected):
        fig = figures.nth(i)
        fig.scroll_into_view_if_needed()
        assert fig.locator("canvas").count() > 0, f"plot {i} has no canvas"
        assert non_empty(fig.screenshot()), f"plot {i} is empty"


def test_report_in_chromium(browser, tmp_path):
    report = tmp_path / "report.html"
    report.write_text(make_report(), encoding="utf-8")
    w = Watched(browser)
    try:
        w.page.goto(report.as_uri())
        # 3 traces, 2 edit bar charts, 2 x (lens grid + lens curves), 1 lens comparison
        assert_plots_render(w.page, 3 + 2 + 4 + 1)
        heat = w.page.locator(".fs-trace-hidden").first
        heat.scroll_into_view_if_needed()
        box = heat.bounding_box()
        x, y = box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5
        w.page.mouse.move(x - 20, y - 10)
        w.page.mouse.move(x, y, steps=5)
        tip = w.page.locator(".bk-tooltip-content").first
        tip.wait_for(state="visible", timeout=10_000)
        text = tip.inner_text()
        assert "layer" in text and "p(answer)" in text and "gap restored" in text
        w.page.screenshot(path=str(shots_dir(tmp_path) / "report.png"), full_page=True)
        assert w.errors == []
        assert w.external() == []
    finally:
        w.close()


#: every element of the page, in the document and in every shadow root (Bokeh 3 draws into shadow
#: DOM), walked recursively: links and sources that run script, MathJax output, and the texts shown
PAGE_SCAN = """() => {
  const out = {scripted: [], math: [], texts: []};
  const walk = (root) => {
    for (const el of root.querySelectorAll("*")) {
      for (const attr of el.getAttributeNames()) {
        if (attr === "href" || attr === "src" || attr.endsWith(":href") || attr === "action" || attr === "formaction") {
          const value = (el.getAttribute(attr) || "").replace(/[\\s\\u0000-\\u001f]/g, "").toLowerCase();
          if (value.startsWith("javascript:")) out.scripted.push(`${el.tagName} ${attr}=${value}`);
        }
      }
      const tag = el.tagName.toLowerCase();
      if (tag.startsWith("mjx-") || el.classList.contains("MathJax") || el.hasAttribute("data-mml-node")) {
        out.math.push(tag);
      }
      if (tag === "td" || tag === "th" || tag === "h1" || tag === "h2") out.texts.push(el.textContent);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return out;
}"""


def test_hostile_prompt_report_shows_literal_text(browser, tiny_model_dir, tmp_path, monkeypatch):
    """Issue 15: a prompt holding TeX with a javascript: link, through `factscope report` on a tiny
    model, shows as typed; nothing on the page (shadow roots included) links to javascript:, and
    MathJax typesets nothing."""
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    prompt = f"{HOSTILE} The Eiffel Tower is located in the city of"
    report = tmp_path / "hostile.html"
    assert run_tiny_report(tiny_model_dir, report, "--prompt", prompt, "--subject", "The Eiffel Tower",
                           "--target", " Rome", "--no-edited-trace") == 0
    w = Watched(browser)
    try:
        w.page.goto(report.as_uri())
        w.page.locator(".bk-Figure").first.wait_for(state="visible")
        # Playwright's locators pierce shadow roots; the prompt's plain part is there, fixed or not
        w.page.locator("td", has_text="The Eiffel Tower is located in the city of").first.wait_for(state="visible")
        w.page.wait_for_timeout(1000)  # MathJax, were it on the page, typesets after the first paint
        scan = w.page.evaluate(PAGE_SCAN)
        assert scan["scripted"] == []
        assert scan["math"] == []
        assert [t for t in scan["texts"] if HOSTILE in t] == [prompt, prompt]  # settings table and edit table
        cell = w.page.locator("td", has_text=HOSTILE).first
        assert cell.is_visible() and cell.inner_text().strip() == prompt
        cell.click()  # where the TeX link was drawn
        w.page.screenshot(path=str(shots_dir(tmp_path) / "hostile-report.png"), full_page=True)
        assert w.page.title() == "factscope: The Eiffel Tower \u2192 Rome"
        assert w.errors == []
        assert w.external() == []
    finally:
        w.close()


@pytest.mark.embedded
def test_exported_notebook_in_chromium(browser, tmp_path):
    from widgets.export import notebook_html

    nb, _ = executed("tracing")
    page_file = tmp_path / "tracing.html"
    page_file.write_text(notebook_html(nb), encoding="utf-8")
    w = Watched(browser)
    try:
        w.page.goto(page_file.as_uri())
        w.page.locator(".widget-text input").first.wait_for(state="visible", timeout=60_000)  # TracePanel controls
        assert w.page.locator(".widget-button").count() >= 1
        # 3 static heat maps + 1 lens (2 plots) shown with show(), 3 heat maps inside the panel
        assert_plots_render(w.page, 3 + 2 + 3)
        w.page.screenshot(path=str(shots_dir(tmp_path) / "tracing-export.png"), full_page=True)
        assert w.errors == []
        assert w.external() == []
    finally:
        w.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on localhost serving a copy of notebooks/ (JupyterLab autosaves: the
    committed notebooks must not get outputs); stopped after the test."""
    port = _free_port()
    root = tmp_path / "lab-root"
    shutil.copytree(ROOT / "notebooks", root)
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = kernel_env()
    env.update(JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         "--IdentityProvider.token=", "--ServerApp.password=", "--allow-root", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--ServerApp.open_browser=False"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"jupyter lab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.embedded
def test_tracing_notebook_in_jupyterlab(browser, jupyterlab, tmp_path):
    w = Watched(browser, 1600, 1100)
    page = w.page
    try:
        page.goto(f"{jupyterlab}/lab/tree/tracing.ipynb", timeout=120_000)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=120_000)
        page.wait_for_timeout(3000)  # kernel start
        page.locator(".jp-Notebook .jp-Cell").first.click()  # "Run All" needs a focused cell
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        # the panel (an ipywidgets layout) and its BokehModel heat maps appear in the outputs
        page.locator(".jp-OutputArea-output .widget-text input").first.wait_for(state="visible", timeout=480_000)
        panel_plots = page.locator(".jp-OutputArea-output .widget-box .bk-Figure")
        panel_plots.first.wait_for(state="visible", timeout=120_000)
        # wait until every cell has run (no "[*]" prompt left)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and page.locator(".jp-InputPrompt", has_text="[*]").count():
            page.wait_for_timeout(1000)
        assert page.locator(".jp-InputPrompt", has_text="[*]").count() == 0
        assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] .ansi-red-fg").count() == 0
        assert page.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0
        assert panel_plots.count() == 3
        fig = panel_plots.first
        fig.scroll_into_view_if_needed()
        assert non_empty(fig.screenshot())
        assert "Could not create a view" not in page.content()
        page.screenshot(path=str(shots_dir(tmp_path) / "jupyterlab-tracing.png"))
    except Exception:
        page.screenshot(path=str(shots_dir(tmp_path) / "jupyterlab-tracing-failed.png"))
        raise
    finally:
        w.close()
