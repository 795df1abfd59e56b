"""Reports, exported notebooks and JupyterLab in a real headless Chromium (Debian's package).

Playwright drives ``/usr/bin/chromium`` (its own browser downloads cannot work offline) with a
fresh profile. Bokeh draws inside shadow roots: Playwright locators pierce them. Screenshots go
to ``$FACTSCOPE_SCREENSHOTS`` (default: the test's tmp dir).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from notebook_runs import ROOT, executed, kernel_env
from pdf_layout import MARK_FIGURES, cut_figures, image_boxes
from test_health_page import recorded_rows
from test_report import make_report, reference_traces, run_tiny_report
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
        # 3 traces, 2 edit bar charts, 1 lens comparison, 2 x (lens grid + lens curves)
        assert_plots_render(w.page, 3 + 2 + 1 + 4)
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


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """A JupyterLab server on localhost serving a copy of notebooks/ (JupyterLab autosaves: the
    committed notebooks must not get outputs; what they write stays in the copy), every cell kept
    in the page (no windowing); stopped after the module's tests."""
    tmp_path = tmp_path_factory.mktemp("lab")
    port = _free_port()
    root = tmp_path / "lab-root"
    shutil.copytree(ROOT / "notebooks", root)
    settings = tmp_path / "lab-settings" / "@jupyterlab"
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
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


def _shut_down_kernels(lab: str) -> None:
    """Stop every kernel of the server (each holds a model), through Jupyter's REST API."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{lab}/api/kernels", timeout=30) as r:
        kernels = json.load(r)
    for k in kernels:
        urllib.request.urlopen(urllib.request.Request(f"{lab}/api/kernels/{k['id']}", method="DELETE"), timeout=30)


def _run_all(page, lab: str, name: str) -> None:
    """Open ``name``.ipynb in JupyterLab, Run All Cells, wait until every cell has run, and check
    that no cell failed."""
    page.goto(f"{lab}/lab/tree/{name}.ipynb?reset", timeout=120_000)  # ?reset: no tab of an earlier test restored
    nb = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")  # the open notebook only
    nb.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=120_000)
    page.wait_for_timeout(3000)  # kernel start
    nb.locator(".jp-Notebook .jp-Cell").first.click()  # "Run All" needs a focused cell
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    prompts = nb.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        texts = prompts.all_inner_texts()
        if texts and all(re.fullmatch(r"\[\d+\]:", t.strip()) for t in texts):
            break
        page.wait_for_timeout(1000)
    texts = prompts.all_inner_texts()
    assert texts and all(re.fullmatch(r"\[\d+\]:", t.strip()) for t in texts), f"{name}: cells not run: {texts}"
    assert nb.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] .ansi-red-fg").count() == 0
    assert nb.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0
    assert "Could not create a view" not in page.content()
    figures = nb.locator(".jp-OutputArea-output .bk-Figure")
    assert figures.count() > 0, f"{name}: no figure drawn"
    figures.first.scroll_into_view_if_needed()
    assert non_empty(figures.first.screenshot())


def _status(page, panel: str):
    return page.locator(f".{panel} .fs-status").first


def _click_through_panels(page, shots: Path) -> None:
    """The editing notebook's linked panels as a user clicks them: a trace cell (its layer-by-layer
    view opens), Edit then Cancel (the panel says the model is as it was), Edit to the end (the
    edited model's trace next to the original), Undo."""
    trace = page.locator(".fs-trace-panel").first
    edit = page.locator(".fs-edit-panel").first
    heat = trace.locator(".bk-Figure").first
    heat.scroll_into_view_if_needed()
    figures_before = trace.locator(".bk-Figure").count()
    box = heat.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
    status = _status(page, "fs-trace-panel")
    status.filter(has_text="layer-by-layer view of").wait_for(timeout=120_000)
    assert trace.locator(".bk-Figure").count() == figures_before + 2  # the lens grid and its curves

    edit.scroll_into_view_if_needed()
    edit_button = edit.locator("button", has_text="Edit").first
    cancel = edit.locator("button", has_text="Cancel").first
    edit_button.click()
    cancel.wait_for(state="visible", timeout=30_000)
    page.wait_for_timeout(1500)  # the edit is under way (its v* optimisation takes far longer)
    cancel.click()
    _status(page, "fs-edit-panel").filter(has_text="cancelled").wait_for(timeout=300_000)
    assert "no edits applied" in edit.inner_text()

    edit_button.click()
    _status(page, "fs-edit-panel").filter(has_text="applied").wait_for(timeout=900_000)
    # the edit's two bar charts, and original | edited | difference of the MLP trace
    edit.locator(".bk-Figure").nth(4).wait_for(state="visible", timeout=60_000)
    assert edit.locator(".bk-Figure").count() == 5
    diff = edit.locator(".fs-trace-diff").first
    diff.scroll_into_view_if_needed()
    assert non_empty(diff.screenshot())
    page.screenshot(path=str(shots / "jupyterlab-edited.png"), full_page=True)
    edit.locator("button", has_text="Undo last").first.click()
    _status(page, "fs-edit-panel").filter(has_text="reverted").wait_for(timeout=120_000)
    assert "no edits applied" in edit.inner_text() and edit.locator(".bk-Figure").count() == 2


NOTEBOOK_NAMES = ("tracing", "editing", "classroom", "mass_editing", "averages")


@pytest.mark.embedded
@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_in_jupyterlab(browser, jupyterlab, tmp_path, name):
    """Every notebook runs top to bottom in a real JupyterLab with its figures and panels drawn;
    in the editing notebook, the panels are clicked through (a trace cell, Edit, Cancel, Undo)."""
    w = Watched(browser, 1600, 1100)
    page = w.page
    try:
        _run_all(page, jupyterlab, name)
        if name == "tracing":  # the panel (an ipywidgets layout) and its BokehModel heat maps
            assert page.locator(".jp-OutputArea-output .fs-trace-panel .bk-Figure").count() == 3
        if name == "editing":
            _click_through_panels(page, shots_dir(tmp_path))
        page.screenshot(path=str(shots_dir(tmp_path) / f"jupyterlab-{name}.png"))
    except Exception:
        page.screenshot(path=str(shots_dir(tmp_path) / f"jupyterlab-{name}-failed.png"), full_page=True)
        raise
    finally:
        w.close()
        _shut_down_kernels(jupyterlab)


# ------------------------------------------------------------------------ issue 20: fits, prints
#: phone and laptop: the page must never scroll sideways
VIEWPORTS = [(1280, 800), (390, 844)]
OVERFLOW = "() => [document.scrollingElement.scrollWidth, window.innerWidth]"


@pytest.fixture(scope="module")
def report_pages(tmp_path_factory, tiny_model_dir):
    """Three pages as users make them: ``factscope report --from-trace`` of a real trace (ROME's code on
    the embedded model, 30 layers: the width that ran off the screen), the whole pipeline on a
    tiny model (traces, edit, edited traces with differences, layer-by-layer view), and
    ``factscope health-page`` of the recorded 4 x 100 MEMIT sequence (same template)."""
    import json

    d = tmp_path_factory.mktemp("pages")
    trace_json = d / "catalonia.json"
    trace_json.write_text(json.dumps([t.to_dict() for t in reference_traces().values()]), encoding="utf-8")
    from widgets.cli import main

    assert main(["report", "--from-trace", str(trace_json), "--out", str(d / "reference.html")]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTSCOPE_CACHE", str(d / "cache"))
        assert run_tiny_report(tiny_model_dir, d / "full.html") == 0
    rows, settings = recorded_rows()
    (d / "seq").mkdir()
    (d / "seq" / "run.json").write_text(json.dumps({"settings": settings, "guard": {"max_norm_growth": 1.2}}))
    (d / "seq" / "health.json").write_text(json.dumps({"rows": rows, "breach": None}))
    assert main(["health-page", str(d / "seq"), "--out", str(d / "health.html")]) == 0
    return {"reference": d / "reference.html", "full": d / "full.html", "health": d / "health.html"}


#: figures of each report: 3 traces; full: 3 traces, 2 edit charts, 3 x 3 original/edited/difference,
#: 1 lens comparison, 2 x (lens grid + curves); health: norms, perplexity, edits that hold
FIGURES = {"reference": 3, "full": 3 + 2 + 9 + 1 + 4, "health": 3}


@pytest.mark.parametrize("width, height", VIEWPORTS)
@pytest.mark.parametrize("name", ["reference", "full", "health"])
def test_report_fits_the_screen(browser, report_pages, tmp_path, name, width, height):
    """Issue 20: at 1280 x 800 and on a 390 x 844 phone the page does not scroll sideways, every
    figure is drawn and not empty, the summary comes first and each section says how to read it."""
    w = Watched(browser, width, height)
    try:
        w.page.goto(report_pages[name].as_uri())
        assert_plots_render(w.page, FIGURES[name])
        w.page.wait_for_timeout(500)
        scroll_width, inner = w.page.evaluate(OVERFLOW)
        assert scroll_width <= inner, f"{name} at {width} px scrolls sideways ({scroll_width} > {inner})"
        for i in range(FIGURES[name]):  # no figure sticks out of the page either
            box = w.page.locator(".bk-Figure").nth(i).bounding_box()
            assert box["width"] > 100 and box["x"] >= 0, (i, box)
        order = w.page.evaluate("() => [...document.querySelectorAll('main > section')].map(s => s.id)")
        assert order[0] == "summary" and order[-1] == "provenance"
        assert w.page.locator("section.fs-section .fs-read").count() == len(order) - 2
        w.page.screenshot(path=str(shots_dir(tmp_path) / f"report-{name}-{width}.png"), full_page=True)
        assert w.errors == [] and w.external() == []
    finally:
        w.close()


def test_report_summary_names_the_strongest_cells(browser, report_pages):
    """The summary of the real Catalonia trace, as the browser shows it: the strongest cell of each
    kind with its token and layer (numbers of ROME's own run; test_report checks them independently)."""
    w = Watched(browser, 1280, 800)
    try:
        w.page.goto(report_pages["reference"].as_uri())
        cells = {k: w.page.locator(f"#summary li.fs-cell[data-kind='{k}']").inner_text() for k in ("hidden", "mlp", "attn")}
        assert cells["mlp"].startswith("MLP: strongest at \u201c\u2423of\u201d (last token), layer 22: p(Europe) 0.753")
        assert "within the subject: \u201conia\u201d (last subject token), layer 4" in cells["mlp"]
        assert "layer 28: p(Europe) 0.844" in cells["hidden"] and "layer 18: p(Europe) 0.764" in cells["attn"]
        assert w.page.locator("#summary .fs-verdict").inner_text().startswith("Within the subject, restoring MLP")
    finally:
        w.close()


@pytest.mark.parametrize("name", ["reference", "full", "health"])
def test_printed_report_cuts_no_figure(browser, report_pages, tmp_path, name):
    """Chromium's print to PDF (A4) of the report as laid out on a 1280 px screen: no figure card
    is split by a page break (its top and bottom markers print on one page), every canvas prints
    whole inside its page, and the figures' sections start on new pages (page 1: the summary)."""
    w = Watched(browser, 1280, 800)
    try:
        w.page.goto(report_pages[name].as_uri())
        assert_plots_render(w.page, FIGURES[name])
        w.page.wait_for_timeout(500)
        cards = w.page.evaluate(MARK_FIGURES)
        pdf = shots_dir(tmp_path) / f"report-{name}.pdf"
        w.page.pdf(path=str(pdf), format="A4", print_background=True)
        assert cut_figures(pdf, cards) == []
        boxes = image_boxes(pdf)
        assert len(boxes) >= FIGURES[name]  # each canvas is an image
        cut = [b for b in boxes if not b.inside_page()]
        assert cut == [], f"{len(cut)} of {len(boxes)} figure images cross a page edge: {cut[:3]}"
        assert 0 not in {b.page for b in boxes}
    finally:
        w.close()


def test_pdf_check_finds_a_figure_cut_across_pages(browser, tmp_path):
    """The check above can fail: a figure card (two stacked canvases, as the layer-by-layer view)
    placed across the first page break, without the report's print CSS, is reported as cut."""
    canvas = "<canvas width='300' height='300' style='display:block'></canvas>"
    page_file = tmp_path / "cut.html"
    page_file.write_text(f"<!DOCTYPE html><html><body style='margin:0'><div style='height:800px'></div>"
                         f"<figure class='fs-figure' style='margin:0'>{canvas}{canvas}</figure><script>"
                         "document.querySelectorAll('canvas').forEach(c => {const g = c.getContext('2d');"
                         "g.fillStyle = '#D55E00'; g.fillRect(0, 0, 300, 300);});</script></body></html>")
    w = Watched(browser, 800, 600)
    try:
        w.page.goto(page_file.as_uri())
        assert w.page.evaluate(MARK_FIGURES) == 1
        pdf = tmp_path / "cut.pdf"
        w.page.pdf(path=str(pdf), format="A4")
        assert cut_figures(pdf, 1) == ["card 0: top on [0], bottom on [1]"]
    finally:
        w.close()
