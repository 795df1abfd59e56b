"""widgets.health_page and ``factscope health-page``: the sequential-editing health read-out on the page
template, from the recorded MEMIT sequence (bench/results/memit_sequential.json) and a live tiny one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_model
from test_text import HOSTILE, HOSTILE_TEXTS, math_exposures
from widgets.health_page import (health_page, health_page_from_run, health_summary, health_table, holds_figure,
                                 norm_figure, perplexity_figure)

ROOT = Path(__file__).resolve().parents[1]


def recorded_rows() -> tuple[list[dict], dict]:
    """Health rows (``Health.to_dict()`` shape) of the recorded 4 × 100 MEMIT sequence: norm ratio per
    edited layer, perplexity, this batch's ES as efficacy, the first batch's ES as retention."""
    figures = json.loads((ROOT / "bench" / "results" / "memit_sequential.json").read_text())["figures"]
    modules = [f"model.layers.{l}.mlp.down_proj" for l in figures["layers"]]
    rows = []
    for b, r in enumerate(figures["rows"]):
        rows.append({"batch": b, "n_edits": r["edits"], "perplexity": r["perplexity"], "seconds": 0.0,
                     "norm_ratio": dict(zip(modules, r["norm_ratio"] or [1.0] * len(modules))),
                     "efficacy": r["this_batch"]["after"]["ES"] / 100 if r["this_batch"] else None,
                     "retention": r["first_batch"]["ES"] / 100 if b > 1 else None})
    return rows, {"model": figures["model"], "method": "memit", "batch size": figures["batch"],
                  "layers": figures["layers"], "dataset": figures["dataset"]}


def test_summary_gives_the_growth_the_perplexity_and_retention():
    rows, _ = recorded_rows()
    text = health_summary(rows)
    assert "layer 6 grew to 1.1030 × its unedited size (+10.30%) by batch 4" in text
    assert "18.360 unedited, 21.480 after batch 4 (+17.0%)" in text
    assert "Earlier edits that still hold: 92% after batch 4 (lowest 92%, batch 4)" in text
    assert "Edits of each batch that hold: 97% to 100%" in text
    assert "400 edits in 4 batches" in text


def test_figures_carry_the_read_outs():
    rows, _ = recorded_rows()
    norms = norm_figure(rows, limit=1.1)
    layer6 = norms.select_one({"name": "norm-model.layers.6.mlp.down_proj"}).data
    assert layer6["edits"] == [0, 100, 200, 300, 400] and layer6["ratio"] == [1.0, 1.029, 1.054, 1.077, 1.103]
    assert norms.select_one({"name": "norm_limit"}).location == 1.1
    assert perplexity_figure(rows).select_one({"name": "perplexity_data"}).data["perplexity"] == \
        [18.36, 18.82, 19.42, 20.33, 21.48]
    holds = holds_figure(rows)
    assert holds.select_one({"name": "health_efficacy"}).data["share"] == [97.0, 100.0, 99.0, 97.0]
    assert holds.select_one({"name": "health_retention"}).data["edits"] == [200, 300, 400]
    table = health_table(rows)
    assert table.count("<tr>") == 6 and "1.1030" in table and "21.480" in table


def test_page_order_provenance_and_literal_text():
    rows, settings = recorded_rows()
    settings["model"], settings["method"] = HOSTILE, HOSTILE_TEXTS[3]
    page = health_page(rows, settings=settings, guard={"max_norm_growth": 1.2, "min_retention": 0.8})
    out = page.html()
    order = [out.index(f"id='{s}'") for s in ("summary", "norms", "perplexity", "holds", "table", "provenance")]
    assert order == sorted(order) and "cdn.bokeh.org" not in out
    assert "counterfact-10k" in out and "max_norm_growth" in out and "[2, 3, 4, 5, 6]" in out
    assert "<script>alert(1)" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert math_exposures(page.layout()) == []


def test_a_run_without_retention_leaves_that_chart_out():
    rows, _ = recorded_rows()
    plain = [{k: v for k, v in r.items() if k not in ("efficacy", "retention")} for r in rows]
    out = health_page(plain).html()
    assert "id='holds'" not in out and "was not measured" in out


def test_live_sequential_memit_on_a_tiny_model(tmp_path, monkeypatch):
    """sequential_memit's own Health records (two batches on a tiny model) make a page whose numbers are theirs."""
    from tracer.edit import MemitHyperParams, Request, sequential_memit
    from tracer.edit.templates import context_templates

    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    lm = make_tiny_model("llama")
    requests = [Request("The Eiffel Tower", "{} is in", "Rome"), Request("The Louvre", "{} is in", "Berlin"),
                Request("Big Ben", "{} is in", "Madrid"), Request("The Colosseum", "{} is in", "Oslo")]
    hp = MemitHyperParams(layers=(0, 1), v_steps=2, context_templates_per_start=0)
    assert context_templates(lm, hp) == ("{}",)  # the bare prompts only (the mass-editing notebook's setting)
    records, health = sequential_memit(lm, requests, 2, hp, stats="identity",
                                       texts=["The Eiffel Tower is in Paris. The Louvre is in Paris too."], progress=False)
    try:
        page = health_page(health, settings={"model": lm.name, "method": "memit", "batch size": 2})
        fig = page.sections[0].blocks[0].model
        module = lm.layers.mlp_out_name(1)
        assert fig.select_one({"name": f"norm-{module}"}).data["ratio"] == [h.norm_ratio[module] for h in health]
        assert health[-1].norm_ratio[module] != 1.0
        assert f"{health[-1].perplexity:.3f} after batch 2" in health_summary(health)
    finally:
        for r in reversed(records):
            r.revert(lm)


def _run_dir(tmp_path: Path, breach: dict | None = None) -> Path:
    """A directory as ``factscope sequential --out`` writes it (run.json, health.json)."""
    rows, settings = recorded_rows()
    d = tmp_path / "seq"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"key": "k", "settings": settings, "guard": {"max_norm_growth": 1.08}}))
    (d / "health.json").write_text(json.dumps({"rows": rows[:4], "breach": breach}))
    return d


def test_health_page_command(tmp_path, capsys):
    from widgets.cli import main

    breach = {"batch": 4, "crossed": [{"reading": "norm growth of model.layers.6.mlp.down_proj", "value": 1.103,
                                       "limit": 1.08}], "reverted": True}
    d = _run_dir(tmp_path, breach)
    out = tmp_path / "health.html"
    assert main(["health-page", str(d), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Stopped at batch 4: norm growth of model.layers.6.mlp.down_proj 1.103 (limit 1.08)" in text
    assert "300 edits in 3 batches" in text and "max_norm_growth" in text
    assert health_page_from_run(d).provenance["Settings"]["dataset"] == "counterfact-10k"


@pytest.mark.parametrize("setup, message", [("missing", "holds no health.json"), ("bad", "not valid JSON"),
                                            ("shape", "has no list of rows")])
def test_health_page_command_refuses_what_is_not_a_run(tmp_path, capsys, setup, message):
    from widgets.cli import main

    d = tmp_path / "seq"
    d.mkdir()
    if setup == "bad":
        (d / "health.json").write_text("{")
    elif setup == "shape":
        (d / "health.json").write_text("[1, 2]")
    assert main(["health-page", str(d), "--out", str(tmp_path / "h.html")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "h.html").exists()
