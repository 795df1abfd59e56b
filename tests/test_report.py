"""widgets/report.py and ``factscope report``: one offline HTML file with traces, edit and lens."""
from __future__ import annotations

import html
import re
from dataclasses import replace

import pytest
from bokeh.models import Div

from test_figures import make_lens, make_trace
from test_text import HOSTILE_TEXTS, math_exposures, texts
from widgets.cli import main
from widgets.report import build_report, library_versions, report_html, save_report

CHECKS = [{"prompt": "The Eiffel Tower is located in the city of", "kind": "rewrite",
           "before": {"top1": " Paris", "p_new": 0.01, "p_true": 0.7}, "after": {"top1": " Rome", "p_new": 0.9, "p_true": 0.02}}]


def network_sources(text: str) -> list[str]:
    """``src``/``href`` attributes of script and link tags that point to the network."""
    return re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']?((?:https?:)?//[^\"' >]+)", text, flags=re.I)


def make_report(**overrides) -> str:
    kwargs = dict(model="tiny-model", traces={k: make_trace(k) for k in ("hidden", "mlp", "attn")},
                  edit_checks=CHECKS, new_target=" Rome", true_target=" Paris", lens=[make_lens(0), make_lens(1)],
                  settings={"samples": 3, "noise": "3s"})
    kwargs.update(overrides)
    return report_html(**kwargs)


def test_report_is_offline_and_complete():
    text = make_report()
    assert network_sources(text) == []
    assert "<script>" in text and len(text) > 500_000  # BokehJS inlined
    for needle in ("tiny-model", "transformers", "bokeh", "torch", library_versions()["bokeh"],
                   "Causal traces", "Edit: Paris \u2192 Rome", "Layer by layer"):
        assert needle in text, needle
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", text)  # the date


def test_network_sources_detects_cdn_tags():
    assert network_sources('<script src="https://cdn.example/x.js"></script><link href="//cdn.x/y.css">') == [
        "https://cdn.example/x.js", "//cdn.x/y.css"]


def test_report_layout_has_every_figure():
    layout = build_report(model="m", traces={k: make_trace(k) for k in ("hidden", "mlp")}, edit_checks=CHECKS,
                          edited_traces=[make_trace("hidden", seed=4)], lens=[make_lens()])
    names = {m.name for m in layout.references() if getattr(m, "name", None)}
    assert {"trace_hidden", "trace_mlp", "edit_new", "edit_true", "lens_top", "lens_lines", "edited_heading"} <= names
    assert "settings" not in names  # no settings given, no settings table


#: the hostile tokens of a prompt that starts with HOSTILE (each one a tick label and a tooltip value)
HOSTILE_TOKENS = ["$$", "\\href{javascript:document.title=1}", "{\\Huge\\text{click}}", "$$", " E", "iff"]


def hostile_report_kwargs() -> dict:
    """Every user, dataset and model string of a report made hostile (TeX in each delimiter
    form, HTML, right-to-left text, a control character)."""
    a, b, c, d = HOSTILE_TEXTS
    traces = {k: replace(make_trace(k), tokens=HOSTILE_TOKENS, prompt="".join(HOSTILE_TOKENS), subject=b, answer=a,
                         subject_span=(4, 6)) for k in ("hidden", "mlp", "attn")}
    lens = [replace(make_lens(i), tokens=HOSTILE_TOKENS[:4], targets=[a, b], label=c,
                    top_tokens=[[HOSTILE_TOKENS[p]] * 5 for p in range(4)]) for i in range(2)]
    checks = [{"prompt": a, "kind": d, "before": {"top1": b, "p_new": 0.01, "p_true": 0.7},
               "after": {"top1": c, "p_new": 0.9, "p_true": 0.02}}]
    return dict(model=a, traces=traces, edited_traces=traces, edit_checks=checks,
                generations=[{"prompt": a, "before": b, "after": d}], new_target=a, true_target=b, lens=lens,
                settings={"prompt": a, b: c, "subject": d}, title=f"factscope: {a} \u2192 {c}")


def test_report_shows_every_hostile_text_literally():
    """No text of the report reaches MathJax: every model passes math_exposures, the page leaves
    out Bokeh's MathJax bundle, and the strings are there as typed (HTML-escaped in the tables)."""
    kwargs = hostile_report_kwargs()
    layout = build_report(**kwargs)
    assert math_exposures(layout) == []
    shown = texts(layout)
    for text in HOSTILE_TEXTS:
        assert html.escape(text) in shown  # in the escaped tables of the Divs
    ticks = next(iter(layout.select({"name": "trace_hidden"}))).yaxis[0].major_label_overrides
    assert [ticks[i].text for i in range(3)] == HOSTILE_TOKENS[:3]  # token tick labels as typed, as PlainText
    assert {d.disable_math for d in layout.select({"type": Div})} == {True}
    page = report_html(**kwargs)
    assert "bokeh-mathjax" not in page  # Bokeh adds MathJax only for text it would typeset
    assert "<script>alert" not in page and page.count("<title>") == 1


def test_save_report_writes_file(tmp_path):
    path = save_report(tmp_path / "sub" / "r.html", model="m", traces=[make_trace()])
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["r.html"]


def run_tiny_report(model_dir, out, *extra) -> int:
    return main(["report", "--model", str(model_dir), "--samples", "2", "--noise", "0.5", "--stats-tokens", "2000",
                 "--out", str(out), *extra])


def test_report_command_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report.html"
    assert run_tiny_report(tiny_model_dir, out) == 0
    printed = capsys.readouterr().out
    assert f"report written to {out.resolve()}" in printed
    text = out.read_text(encoding="utf-8")
    assert network_sources(text) == []
    for needle in ("Causal traces of the edited model", "Layer by layer", "The Louvre is located in the city of",
                   "before the edit", "after the edit", "edit layer", str(tiny_model_dir)):
        assert needle in text, needle


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples must be a whole number in [1, 100000], got 0"),
    (["--subject", "The Louvre"], "does not occur"),
    (["--target", " "], "target_new is empty"),
])
def test_report_command_bad_input(tiny_model_dir, tmp_path, capsys, args, message):
    assert run_tiny_report(tiny_model_dir, tmp_path / "r.html", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_report_command_refuses_a_directory(tiny_model_dir, tmp_path, capsys):
    assert run_tiny_report(tiny_model_dir, tmp_path) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.embedded
@pytest.mark.slow
def test_report_command_on_the_embedded_model(tmp_path, capsys):
    """The README's main job, with 2 noise samples to keep CI short."""
    out = tmp_path / "report.html"
    assert main(["report", "--samples", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "answer ' Paris'" in printed and "report written to" in printed
    text = out.read_text(encoding="utf-8")
    assert network_sources(text) == [] and "smollm2-135m" in text
    rewrite = re.search(r"rewrite\s+'(.*?)'.*?'(.*?)'", printed)
    assert rewrite and rewrite.group(2) == " Rome", printed  # the edit took: top-1 after is Rome
