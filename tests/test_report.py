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
from widgets.figures import token_label
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


# ------------------------------------------------------------------ summary, saved results (issue 20)
def reference_traces() -> dict:
    """The three traces of a real run: ROME's own code on the embedded model, "Catalonia belongs to
    the continent of" -> " Europe" (shared data, rome_reference_trace.json), as TraceResults."""
    import json

    import numpy as np
    from conftest import SHARED_DATA

    from tracer.trace_result import NoiseSpec, TraceResult

    d = json.loads((SHARED_DATA / "rome_reference_trace.json").read_text())
    return {k: TraceResult(prompt=d["prompt"], subject=d["subject"], tokens=d["tokens"],
                           subject_span=tuple(d["subject_range"]), kind=k, window=1 if k == "hidden" else d["window"],
                           scores=np.asarray(d[k]["scores"], dtype=float), low_score=d[k]["low_score"],
                           high_score=d["high_score"], answer=d["answer"], answer_id=0, noise=NoiseSpec(scale=d["noise"]),
                           samples=d["samples"], seed=1, model="smollm2-135m") for k in ("hidden", "mlp", "attn")}


def summary_text(**kwargs) -> str:
    from widgets.report import report_page

    return report_page(model="m", **kwargs).summary.text


def test_summary_names_the_strongest_cells_of_a_real_trace():
    import numpy as np

    traces = reference_traces()
    text = summary_text(traces=traces)
    for kind, r in traces.items():  # the strongest cell, found here independently of widgets.summary
        t, layer = np.unravel_index(np.nanargmax(r.scores), r.scores.shape)
        assert f"\u201c{token_label(r.tokens[t])}\u201d (last token), <b>layer {layer}</b>" in text, kind
        assert f"{r.scores[t, layer]:.3f}" in text
        sub = r.scores[:3]
        ts, ls = np.unravel_index(np.nanargmax(sub), sub.shape)
        assert f"within the subject: \u201c{token_label(r.tokens[ts])}\u201d" in text and f"layer {ls}, p <span class='fs-num'>{sub[ts, ls]:.3f}</span>" in text
    # the numbers of this fact: MLP strongest at " of", layer 22 (0.753); in the subject at "onia", layer 4
    assert "<b>MLP</b>: strongest at \u201c\u2423of\u201d (last token), <b>layer 22</b>: p(Europe) " \
           "<span class='fs-num'>0.753</span>, 93% of the gap restored; within the subject: \u201conia\u201d " \
           "(last subject token), layer 4" in text
    assert "with p = <span class='fs-num'>0.785</span>" in text and "drops to <span class='fs-num'>0.331</span>" in text
    assert text.index("Summary") < text.index("Where the fact is recalled")


@pytest.mark.parametrize("after, verdict", [
    ({"rewrite": (0.9, 0.02), "paraphrase": (0.6, 0.1), "neighbour": (0.05, 0.65)},
     "The edit took: the model now answers \u201cRome\u201d instead of \u201cParis\u201d, and carried over to every "
     "paraphrase; every neighbouring fact kept its answer."),
    ({"rewrite": (0.9, 0.02), "paraphrase": (0.1, 0.6), "neighbour": (0.7, 0.2)},
     "but carried over to only 0 of 1 paraphrases; but it also changed 1 of 1 neighbouring facts (not specific)."),
    ({"rewrite": (0.1, 0.6), "paraphrase": (0.1, 0.6), "neighbour": (0.05, 0.65)},
     "The edit did not take: after it the model still prefers \u201cParis\u201d to \u201cRome\u201d"),
])
def test_summary_verdict_and_edit_numbers(after, verdict):
    checks = [{"prompt": f"{kind} prompt", "kind": kind, "before": {"top1": " Paris", "p_new": 0.01, "p_true": 0.7},
               "after": {"top1": " x", "p_new": a[0], "p_true": a[1]}} for kind, a in after.items()]
    text = summary_text(edit_checks=checks, new_target=" Rome", true_target=" Paris")
    assert verdict in html.unescape(text)
    p_new, p_true = after["rewrite"]
    assert f"0.010 \u2192 {p_new:.3f}</span>, P(<span class='fs-true'>Paris</span>) " \
           f"<span class='fs-num'>0.700 \u2192 {p_true:.3f}" in text


def test_report_page_order_summary_first_provenance_last():
    page = make_report(edited_traces={k: make_trace(k, seed=7) for k in ("hidden", "mlp", "attn")})
    marks = ["id='summary'", "id='traces'", "id='edit'", "id='edited'", "id='lens'", "id='provenance'"]
    assert [page.index(m) for m in marks] == sorted(page.index(m) for m in marks)
    assert page.count("How to read this:") == 4
    assert page.count("<h3>Settings</h3>") == 1  # settings only in the provenance block
    assert page.index("<h3>Settings</h3>") > page.index("id='provenance'")


def test_report_from_saved_results_loads_no_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`factscope report --from-trace T --ledger L`: the page from a saved trace and ledger of a real
    (tiny-model) run, without loading a model; its summary holds the saved numbers."""
    import widgets.commands.report as command
    from tracer.edit import Ledger
    from tracer.trace_result import TraceResult

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    fact = ["--model", str(tiny_model_dir), "--prompt", "The Eiffel Tower is located in the city of",
            "--subject", "The Eiffel Tower"]
    trace_json, ledger = tmp_path / "trace.json", tmp_path / "edit.safetensors"
    assert main(["trace", *fact, "--kind", "all", "--samples", "2", "--noise", "0.5", "--json", str(trace_json)]) == 0
    assert main(["edit", *fact, "--target", " Rome", "--stats-tokens", "2000", "--save-ledger", str(ledger)]) == 0

    def no_model(*a, **k):
        raise AssertionError("a report from saved results must not load a model")

    monkeypatch.setattr(command, "load_model_from_args", no_model)
    out = tmp_path / "saved.html"
    assert main(["report", "--from-trace", str(trace_json), "--ledger", str(ledger), "--edited-trace", str(trace_json),
                 "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert network_sources(text) == []
    record = Ledger.load(ledger)[0]
    assert (f"{record.before['p_new']:.3f} \u2192 {record.after['p_new']:.3f}</span>, P(<span class='fs-true'>"
            f"{html.escape(record.target_true.strip())}</span>) <span class='fs-num'>{record.before['p_true']:.3f} "
            f"\u2192 {record.after['p_true']:.3f}") in text
    mlp = TraceResult.from_dict([d for d in __import__("json").loads(trace_json.read_text()) if d["kind"] == "mlp"][0])
    t, layer, score = mlp.strongest(1)[0]
    assert f"\u201c{html.escape(token_label(mlp.tokens[t]))}\u201d" in text and f"<b>layer {layer}</b>" in text and f"{score:.3f}" in text
    assert record.id in text and "id='edited'" in text and "trace_diff_mlp" in text
    assert "from saved results" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--from-trace", "missing.json"], "does not exist"),
    (["--from-trace", "{bad}"], "is not the JSON of `factscope trace --json`"),
    (["--ledger", "x.safetensors"], "pass --from-trace too"),
])
def test_report_from_saved_results_bad_input(tmp_path, capsys, args, message):
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "mlp"}')
    args = [str(bad) if a == "{bad}" else str(tmp_path / a) if a.endswith((".json", ".safetensors")) else a for a in args]
    assert main(["report", *args, "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
