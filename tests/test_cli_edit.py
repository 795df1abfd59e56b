"""``factscope edit``: output, --json checks, ledger and model files; bad input exits 2, files untouched."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import make_tiny_model

from tracer.cli import build_parser, main
from tracer.commands.edit import settings
from tracer.edit import Ledger, ROMEHyperParams
from tracer.stats import StatsCache


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_edit_writes_json_ledger_and_model(tiny_dir, tmp_path, capsys):
    before = _digest(tiny_dir)
    js, ledger, model_dir = tmp_path / "e.json", tmp_path / "e.safetensors", tmp_path / "edited"
    code, out, err = _run(["edit", "--model", str(tiny_dir), "--subject", "The Eiffel Tower", "--prompt",
                           "{} is located in the city of", "--target", " Rome", "--check", "The Louvre is in",
                           "--check", "Paris is", "--steps", "3", "--stats-tokens", "300", "--stats-dir",
                           str(tmp_path / "stats"), "--json", str(js), "--save-ledger", str(ledger), "--save-model",
                           str(model_dir), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "The Eiffel Tower is located in the city of" in out and "The Louvre is in" in out
    doc = json.loads(js.read_text())
    assert [c["prompt"] for c in doc["checks"]] == ["The Eiffel Tower is located in the city of", "The Louvre is in", "Paris is"]
    for c in doc["checks"]:
        for when in ("before", "after"):
            assert set(c[when]) >= {"top1", "p_new", "p_true"} and 0 <= c[when]["p_new"] <= 1
    assert doc["checks"][0]["before"]["top1"] == doc["target_true"]  # default true target: the model's top-1
    assert doc["statistics"]["kind"] == "second_moment" and doc["statistics"]["n_tokens"] == 300
    assert doc["hparams"]["v_num_grad_steps"] == 3 and len(doc["loss"]) == 3
    assert _digest(tiny_dir) == before  # the source model's files are untouched
    # the ledger re-applied to a fresh copy gives the exported model's weights
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    fresh = make_tiny_model("gpt2")
    Ledger(fresh).apply_all(Ledger.load(ledger))
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, exported[k]), k
    assert Ledger.load(ledger)[0].id == doc["id"]


@pytest.mark.parametrize("args, message", [
    (["--subject", "The Louvre", "--prompt", "The Eiffel Tower is in"], "does not occur"),
    (["--layer", "99"], "does not exist"),
    (["--target", " "], "target_new is empty"),
    (["--steps", "0"], "--steps"),
    (["--steps", "100000000"], "--steps=100000000 is more than the 10000"),
    (["--json", "/nonexistent-dir/x.json"], "directory does not exist"),
])
def test_cli_edit_bad_input_exits_2(tiny_dir, capsys, args, message):
    before = _digest(tiny_dir)
    base = {"--subject": "The Eiffel Tower", "--prompt": "{} is located in the city of", "--target": " Rome"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["edit", "--model", str(tiny_dir), "--no-stats", "--steps", "2"]
    for flag, value in base.items():
        argv += [flag, value]
    code, out, err = _run(argv, capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]  # transformers may draw a loading bar
    assert len(errors) == 1 and errors[0].startswith("factscope edit: error: ") and message in errors[0]
    assert _digest(tiny_dir) == before


def test_cli_edit_refuses_non_empty_model_dir(tiny_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    code, _, err = _run(["edit", "--model", str(tiny_dir), "--subject", "A", "--prompt", "{} is", "--target", " B",
                         "--save-model", str(tmp_path)], capsys)
    assert code == 2 and "not an empty directory" in err
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_cli_uses_default_sized_statistics(tiny_dir, tmp_path):
    from tracer.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    args = build_parser().parse_args(["edit", "--model", str(tiny_dir), "--subject", "A", "--prompt", "{} is",
                                      "--target", " B", "--stats-dir", str(tmp_path)])
    hp, stats = settings(args, lm)
    assert hp == ROMEHyperParams.for_model(lm)
    assert hp.stats_tokens == ROMEHyperParams(layer=0).stats_tokens == 100_000
    assert isinstance(stats, StatsCache) and stats.directory == tmp_path
    args = build_parser().parse_args(["edit", "--model", str(tiny_dir), "--subject", "A", "--prompt", "{} is",
                                      "--target", " B", "--no-stats", "--layer", "2", "--update", "original"])
    hp, stats = settings(args, lm)
    assert stats == "identity" and hp.layer == 2 and hp.update == "original"


@pytest.mark.embedded
def test_cli_embedded_eiffel_tower(tmp_path, capsys, embedded):
    stats_dir = tmp_path / "stats"
    StatsCache(stats_dir).get(embedded, 4, 4096, progress=False)
    js = tmp_path / "e.json"
    code, out, err = _run(["edit", "--model", "smollm2-135m", "--subject", "The Eiffel Tower", "--prompt",
                           "{} is located in the city of", "--target", " Rome", "--check",
                           "The Louvre is located in the city of", "--stats-tokens", "4096", "--stats-dir", str(stats_dir),
                           "--json", str(js), "--device", "cpu"], capsys)
    assert code == 0, err
    checks = json.loads(js.read_text())["checks"]
    assert checks[0]["before"]["top1"] == " Paris" and checks[0]["after"]["top1"] == " Rome"
    assert checks[1]["after"]["top1"] == " Paris" and checks[1]["after"]["p_true"] > checks[1]["after"]["p_new"]


def test_cli_edit_refuses_a_long_check_prompt_before_editing(tiny_dir, capsys, monkeypatch):
    """A --check prompt longer than the model's positions is refused by name before the edit is
    computed (it used to fail with an IndexError after the whole edit)."""
    import tracer.edit.rome as rome

    def no_edit(*args, **kwargs):
        raise AssertionError("rome_edit must not run")

    monkeypatch.setattr(rome, "rome_edit", no_edit)
    long = "The Louvre is located in the city of " * 40
    code, out, err = _run(["edit", "--model", str(tiny_dir), "--no-stats", "--steps", "2", "--subject", "The Eiffel Tower",
                           "--prompt", "{} is located in the city of", "--target", " Rome",
                           "--check", "The Louvre is in", "--check", long], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("factscope edit: error: --check prompt 2 'The Louvre")
    assert "but the model reads at most 128" in errors[0]
    code, out, err = _run(["edit", "--model", str(tiny_dir), "--no-stats", "--subject", "The Eiffel Tower",
                           "--prompt", "{} is located in " + "the city of " * 40, "--target", " Rome"], capsys)
    assert code == 2 and "the --prompt 'The Eiffel Tower is located in the city" in err and "context template" in err
