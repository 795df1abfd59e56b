"""Hostile text, numbers and files through the command line: every run ends in exit 0 or exit 2 with
a one-line error, never a traceback; text stays data in every file a run writes.

Runs ``trace``, ``edit``, ``report``, ``evaluate`` and ``trace-dataset`` in this process on the tiny
GPT-2 model directory with hypothesis-made input: HTML, TeX, control characters, right-to-left
marks, format placeholders, 100k-character strings, NaN/inf and out-of-range numbers. An exception
escaping ``widgets.cli.main`` fails the test with the input that caused it.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from widgets.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

SCRIPT = "<script>alert(1)</script>"
TEX = r"$$\href{javascript:document.title=1}{\Huge\text{click}}$$"
NASTY = [
    SCRIPT, TEX, r"\(\style{color:red}{x}\)", "$x$", "</script><img src=x onerror=alert(1)>", "\u202eevil\u202c",
    "\x00\x01\x1b[31mred\x1b[0m\x7f", "{}", "{0} %s %(x)s", "\ufeff\u200b", "  ", "é中文🙂", "A" * 100_000,
    "]]></x>&amp;&lt;", "\r\n\t",
]
text = st.one_of(st.sampled_from(NASTY), st.text(st.characters(exclude_categories=("Cs",)), max_size=30))
numbers = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e309", "1e-400", "", "3s", "nans", "-3s", "1e400s",
                           "4294967296", "20000000", "1", "2"])
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """``factscope ARGV`` in this process: (exit status, stderr). Any other exception propagates."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage + one error line, status 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 2:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1, err
    return rc, err


@st.composite
def prompts(draw):
    """(prompt, subject): hostile text around a hostile subject, or a subject not in the prompt."""
    subject = draw(st.one_of(st.just(SUBJECT), text))
    prompt = draw(text) + subject + draw(text)
    if draw(st.booleans()):
        subject = draw(text)
    return prompt, subject


@given(pair=prompts())
@settings(max_examples=25, **SETTINGS)
def test_trace_takes_any_text(capsys, tmp_path_factory, tiny_model_dir, pair):
    prompt, subject = pair
    out = tmp_path_factory.mktemp("trace") / "t.json"
    rc, _ = run(capsys, ["trace", "--model", str(tiny_model_dir), "--prompt", prompt, "--subject", subject,
                         "--kind", "hidden", "--samples", "1", "--no-progress", "--json", str(out)])
    if rc == 0:
        doc = json.loads(out.read_text())
        assert doc["prompt"] == prompt and doc["subject"] == subject


@given(samples=numbers, noise=numbers, window=numbers, seed=numbers)
@settings(max_examples=25, **SETTINGS)
def test_trace_takes_any_number(capsys, tiny_model_dir, samples, noise, window, seed):
    run(capsys, ["trace", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "mlp",
                 "--samples", samples, "--noise", noise, "--window", window, "--seed", seed, "--no-progress"])


@given(pair=prompts(), target=text, check=text, steps=st.sampled_from(["2", "0", "-1", "nan", "100000000"]))
@settings(max_examples=10, **SETTINGS)
def test_edit_takes_any_text_and_leaves_nothing_on_refusal(capsys, tmp_path_factory, tiny_model_dir, pair, target,
                                                           check, steps):
    prompt, subject = pair
    d = tmp_path_factory.mktemp("edit")
    rc, _ = run(capsys, ["edit", "--model", str(tiny_model_dir), "--prompt", prompt, "--subject", subject,
                         "--target", target, "--check", check, "--no-stats", "--steps", steps,
                         "--json", str(d / "e.json"), "--save-ledger", str(d / "e.safetensors")])
    if rc == 2:
        assert list(d.iterdir()) == []
    else:
        assert json.loads((d / "e.json").read_text())["request"]["target_new"] == target


@given(pair=prompts(), target=text, other=text)
@settings(max_examples=5, **SETTINGS)
def test_report_takes_any_text_and_writes_no_live_markup(capsys, tmp_path_factory, tiny_model_dir, pair, target, other):
    prompt, subject = pair
    out = tmp_path_factory.mktemp("report") / "r.html"
    rc, _ = run(capsys, ["report", "--model", str(tiny_model_dir), "--prompt", prompt + SCRIPT, "--subject", subject,
                         "--target", target, "--paraphrase", other, "--neighbour", SCRIPT + other,
                         "--samples", "1", "--stats-tokens", "0", "--no-edited-trace", "--out", str(out)])
    if rc == 0:
        assert SCRIPT not in out.read_text(encoding="utf-8")
    else:
        assert not out.exists()


def _counterfact_record(subject: str, prompt: str, new: str, true: str, other: str) -> dict:
    return {"case_id": 7, "requested_rewrite": {"subject": subject, "prompt": prompt, "target_new": {"str": new},
                                                 "target_true": {"str": true}, "relation_id": other},
            "paraphrase_prompts": [other + " " + subject], "neighborhood_prompts": [other],
            "attribute_prompts": [other], "generation_prompts": [other]}


@given(subject=text, new=text, true=text, other=text)
@settings(max_examples=5, **SETTINGS)
def test_evaluate_takes_any_dataset_text(capsys, tmp_path_factory, tiny_model_dir, subject, new, true, other):
    d = tmp_path_factory.mktemp("evaluate")
    data = d / "cf.json"
    data.write_text(json.dumps([_counterfact_record(subject, other + "{} " + SCRIPT, new, true, other)]))
    rc, _ = run(capsys, ["evaluate", "--model", str(tiny_model_dir), "--method", "rome", "--dataset", "counterfact",
                         "--data", str(data), "--limit", "1", "--stats", "identity", "--no-generation",
                         "--hparam", "v_num_grad_steps=2", "--out", str(d / "out")])
    if rc == 0:
        assert SCRIPT not in (d / "out" / "summary.html").read_text(encoding="utf-8")


@given(subject=text, prompt=text, attribute=text)
@settings(max_examples=5, **SETTINGS)
def test_trace_dataset_takes_any_fact_text(capsys, tmp_path_factory, tiny_model_dir, subject, prompt, attribute):
    d = tmp_path_factory.mktemp("dataset")
    facts = d / "facts.json"
    facts.write_text(json.dumps([{"known_id": 0, "subject": subject, "attribute": attribute, "template": "{}",
                                  "prediction": attribute, "prompt": prompt + subject, "relation_id": attribute}]))
    run(capsys, ["trace-dataset", "--model", str(tiny_model_dir), "--facts", str(facts), "--kind", "hidden",
                 "--samples", "1", "--n-boot", "10", "--out", str(d / "out"), "--html", str(d / "a.html")])


MALFORMED = ["", "not json", "[1, 2]", "{}", '{"a": 1}', "[{}]", '[{"subject": 1}]', "null", '"x"', "[[]]",
             '[{"known_id": "x", "subject": null, "prompt": [], "attribute": {}}]']


@pytest.mark.parametrize("content", MALFORMED)
def test_malformed_input_files_get_one_line_errors(capsys, tmp_path, tiny_model_dir, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    model = ["--model", str(tiny_model_dir)]
    assert run(capsys, ["trace-dataset", *model, "--facts", str(bad), "--kind", "hidden", "--samples", "1",
                        "--out", str(tmp_path / "d")])[0] == 2
    for dataset in ("counterfact", "counterfact-10k", "zsre"):
        assert run(capsys, ["evaluate", *model, "--method", "none", "--dataset", dataset, "--data", str(bad),
                            "--limit", "1", "--stats", "identity", "--no-generation", "--out", str(tmp_path / dataset)])[0] == 2
