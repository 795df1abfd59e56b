"""The evaluation suite: scoring, the papers' metrics on hand-made numbers, text statistics, harness."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from float32 import logprob_tol
from tracer.errors import FactscopeError, HyperParameterError
from tracer.evaluate import (Case, Tfidf, case_scores, harmonic_mean, load_cases, ngram_entropy, run_evaluation,
                             score_targets, summarize, summary_markdown)
from tracer.generation import sample as generate
from tracer.evaluate.metrics import measure_probabilities, reference_text
from tracer.scoring import TargetScore, split_prompt_target

# ---------------------------------------------------------------------------- scoring


def test_target_score_definitions():
    s = TargetScore(logprobs=(math.log(0.5), math.log(0.125)), correct=(True, False))
    assert s.nll == pytest.approx(-(math.log(0.5) + math.log(0.125)) / 2)
    assert s.prob == pytest.approx(0.25)  # geometric mean of 0.5 and 0.125
    assert s.accuracy == 0.5
    assert TargetScore.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_score_targets_matches_full_forward(tiny_lm):
    pairs = [("The city of Paris is", "in France"), ("A dog", "barks"), ("The city of Paris is", "old")]
    batched = score_targets(tiny_lm, pairs, batch_size=2)
    # right-padded batches against one unpadded row: other shapes, so float32 sums in other orders
    # along the whole path, then a float32 log-softmax on each side (tests/float32.py); attention
    # runs over the longest padded row
    width = max(len(split_prompt_target(tiny_lm.tokenizer, p, t)[0]) for p, t in pairs)
    for (prompt, target), got in zip(pairs, batched):
        ids, n_prefix = split_prompt_target(tiny_lm.tokenizer, prompt, target)
        with torch.no_grad():
            logits = tiny_lm.model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        want = [float(lp[p - 1, ids[p]]) for p in range(n_prefix, len(ids))]
        hits = [int(logits[p - 1].argmax()) == ids[p] for p in range(n_prefix, len(ids))]
        assert got.n_tokens == len(ids) - n_prefix >= 1
        np.testing.assert_allclose(got.logprobs, want, atol=logprob_tol(tiny_lm, width, max(map(abs, want))), rtol=0)
        assert list(got.correct) == hits


def test_split_prompt_target_separates_prompt(tiny_lm):
    ids, n_prefix = split_prompt_target(tiny_lm.tokenizer, "The Eiffel Tower is in", "Rome")
    assert tiny_lm.tokenizer.decode(ids[n_prefix:]).strip() == "Rome"
    assert tiny_lm.tokenizer.decode(ids[:n_prefix]).strip().endswith("in")


# ---------------------------------------------------------------------------- metrics on hand-made numbers


def _nll(p):
    return -math.log(p)


def test_counterfact_case_scores_known_probabilities():
    probs = {
        "rewrite": [{"nll_new": _nll(0.6), "nll_true": _nll(0.2)}],
        "paraphrase": [{"nll_new": _nll(0.3), "nll_true": _nll(0.4)}, {"nll_new": _nll(0.5), "nll_true": _nll(0.1)}],
        "neighborhood": [{"nll_new": _nll(0.1), "nll_true": _nll(0.7)}, {"nll_new": _nll(0.2), "nll_true": _nll(0.1)}],
    }
    s = case_scores(probs)
    assert s["rewrite_success"] == 1.0 and s["rewrite_diff"] == pytest.approx(0.4)
    assert s["paraphrase_success"] == 0.5 and s["paraphrase_diff"] == pytest.approx((-0.1 + 0.4) / 2)
    assert s["neighborhood_success"] == 0.5 and s["neighborhood_diff"] == pytest.approx((0.6 - 0.1) / 2)


def test_summary_and_harmonic_score():
    cases = [
        {"rewrite_success": 1.0, "rewrite_diff": 0.4, "paraphrase_success": 0.5, "paraphrase_diff": 0.1,
         "neighborhood_success": 1.0, "neighborhood_diff": 0.2, "ngram_entropy": 6.0, "reference_score": 0.3},
        {"rewrite_success": 0.0, "rewrite_diff": -0.2, "paraphrase_success": 0.5, "paraphrase_diff": 0.0,
         "neighborhood_success": 0.5, "neighborhood_diff": 0.0, "ngram_entropy": 5.0, "reference_score": 0.1},
    ]
    s = summarize(cases)
    assert s["n"] == 2
    assert s["ES"]["mean"] == pytest.approx(50.0) and s["ES"]["std"] == pytest.approx(50.0)
    assert s["EM"]["mean"] == pytest.approx(10.0)
    assert s["PS"]["mean"] == pytest.approx(50.0) and s["NS"]["mean"] == pytest.approx(75.0)
    assert s["GE"]["mean"] == pytest.approx(550.0) and s["RS"]["mean"] == pytest.approx(20.0)
    assert s["S"]["mean"] == pytest.approx(3 / (1 / 50 + 1 / 50 + 1 / 75))
    assert harmonic_mean([0.0, 50.0, 50.0]) == 0.0


def test_zsre_scores_are_token_accuracies():
    probs = {"rewrite": [{"nll": 0.1, "acc": 2 / 3}], "paraphrase": [{"nll": 1.0, "acc": 0.0}],
             "neighborhood": [{"nll": 2.0, "acc": 0.5}]}
    s = case_scores(probs)
    assert s == {"rewrite_acc": pytest.approx(2 / 3), "paraphrase_acc": 0.0, "neighborhood_acc": 0.5}
    summary = summarize([s, {"rewrite_acc": 1.0, "paraphrase_acc": 1.0, "neighborhood_acc": 0.5}])
    assert summary["Efficacy"]["mean"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert summary["Specificity"]["mean"] == pytest.approx(50.0)
    assert "S" not in summary


# ---------------------------------------------------------------------------- text statistics


def test_ngram_entropy_direct():
    # bigrams of "a b a b": (a b) x2, (b a) x1; trigrams: (a b a), (b a b)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("word") == 0.0
    # punctuation is a token
    assert ngram_entropy("a, b") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)


def test_tfidf_matches_direct_computation():
    docs = ["the cat sat on the mat", "the dog sat", "a cat ran far"]
    tf = Tfidf.fit(docs)
    vocab = sorted({w for d in docs for w in d.split() if len(w) > 1})
    n = len(docs)
    idf = np.array([math.log((1 + n) / (1 + sum(w in d.split() for d in docs))) + 1 for w in vocab])

    def vec(text):
        counts = np.array([text.lower().split().count(w) for w in vocab], dtype=float)
        v = counts * idf
        return v / np.linalg.norm(v)

    a, b = "The cat sat", "the mat and the cat"
    assert tf.similarity(a, b) == pytest.approx(float(vec(a) @ vec(b)))
    assert tf.similarity(a, a) == pytest.approx(1.0)
    assert tf.similarity("zebra", a) == 0.0  # out of vocabulary
    assert Tfidf.from_dict(json.loads(json.dumps(tf.to_dict()))).similarity(a, b) == pytest.approx(tf.similarity(a, b))


def test_tfidf_cache_refits_corrupted_file(tmp_path):
    import gzip

    corpus = tmp_path / "c.jsonl.gz"
    with gzip.open(corpus, "wt") as f:
        for t in ["alpha beta", "beta gamma", "gamma delta"]:
            f.write(json.dumps({"text": t}) + "\n")
    first = Tfidf.cached(corpus, tmp_path / "cache")
    files = list((tmp_path / "cache").glob("tfidf-*.json"))
    assert len(files) == 1 and first.n_documents == 3
    files[0].write_text(files[0].read_text()[:20])  # truncated
    again = Tfidf.cached(corpus, tmp_path / "cache")
    assert again.idf == first.idf


# ---------------------------------------------------------------------------- records


def test_load_counterfact_records(shared_data):
    full = load_cases("counterfact", limit=3, data_dir=shared_data)
    c = full[0]
    assert c.case_id == 13 and c.subject == "Ferrari F40" and c.target_new == "Microsoft" and c.target_true == "Ferrari"
    assert c.rewrite_prompt == "Ferrari F40, developed by"
    assert len(c.paraphrase_prompts) == 2 and len(c.neighborhood_prompts) == 10 == len(c.specificity_targets)
    assert "Xbox is a product of Microsoft." in reference_text(c)
    small = load_cases("counterfact-10k", limit=2, data_dir=shared_data)
    assert small[0].rewrite_prompt == "The mother tongue of Danielle Darrieux is" and small[0].target_true == "French"
    z = load_cases("zsre", limit=2, data_dir=shared_data)[0]
    assert z.target_new == "uniform" and z.target_true == "" and z.neighborhood_prompts[0].startswith("nq question:")
    assert Case.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(HyperParameterError):
        load_cases("wikidata")


# ---------------------------------------------------------------------------- generation and harness


def test_generation_is_seeded(tiny_lm):
    a = generate(tiny_lm, ["The city", "A"], max_length=12, seed=3)
    b = generate(tiny_lm, ["The city", "A"], max_length=12, seed=3)
    assert a == b and a[0].startswith("The city") and len(a) == 2


def _tiny_counterfact(path):
    rec = {
        "case_id": 7, "pararel_idx": 0,
        "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P1", "subject": "The tower",
                              "target_new": {"str": "Rome", "id": "Q1"}, "target_true": {"str": "Paris", "id": "Q2"}},
        "paraphrase_prompts": ["People say that The tower is in"],
        "neighborhood_prompts": ["The museum is located in", "The bridge is located in"],
        "attribute_prompts": ["The forum is located in"],
        "generation_prompts": ["The tower is famous for"],
    }
    path.write_text(json.dumps([rec, {**rec, "case_id": 8}]))
    return path


def test_harness_ftl_resumable_and_reverts(tmp_path):
    from conftest import make_tiny_model

    lm = make_tiny_model("llama")
    data = _tiny_counterfact(tmp_path / "cf.json")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    tfidf = Tfidf.fit(["The forum is located in Rome", "Paris is a city"])
    out = tmp_path / "run"
    opts = {"layer": 1, "steps": 5, "lr": 1e-2, "norm_constraint": 1e-2}
    s = run_evaluation(lm, "ft-l", "counterfact", out, data_path=data, tfidf=tfidf, generation_length=16,
                       method_options=opts, progress=False)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert s["n_cases"] == 2 and set(s["post"]) >= {"ES", "PS", "NS", "S", "GE", "RS"}
    case = json.loads((out / "cases" / "7.json").read_text())
    assert case["post"]["scores"]["rewrite_diff"] > case["pre"]["scores"]["rewrite_diff"]  # fine-tuning moved it
    again = run_evaluation(lm, "ft-l", "counterfact", out, data_path=data, tfidf=tfidf, generation_length=16,
                           method_options=opts, progress=False)
    assert again["post"] == s["post"]
    assert "| ft-l | 2 |" in (out / "summary.md").read_text() and (out / "summary.html").read_text().startswith("<!DOCTYPE")
    with pytest.raises(FactscopeError):
        run_evaluation(lm, "none", "counterfact", out, data_path=data, tfidf=tfidf, progress=False)


@pytest.mark.parametrize("method,options", [
    ("rome", {"layer": 1, "stats": "identity", "v_num_grad_steps": 15, "context_template_lengths": ((4, 2),)}),
    ("memit", {"layers": (1, 2), "stats": "identity", "v_steps": 15}),
])
def test_harness_editing_methods_restore_weights(tmp_path, method, options, capsys):
    from conftest import make_tiny_model

    lm = make_tiny_model("gpt2")
    data = _tiny_counterfact(tmp_path / "cf.json")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    s = run_evaluation(lm, method, "counterfact", tmp_path / method, data_path=data, batch_size=None,
                       generation=False, method_options=options, progress=True)
    assert s["settings"]["batch_size"] == (2 if method == "memit" else 1)  # None: MEMIT takes all cases at once
    err = capsys.readouterr().err
    assert f"evaluate {method}" in err
    assert ("measuring after" in err and "2/2" in err) == (method == "memit")  # a batch's own cases show progress
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert s["n_cases"] == 2 and s["post"]["EM"]["mean"] != s["pre"]["EM"]["mean"]  # the edit was in place
    if method == "memit":  # on random tiny models ROME's averaged k* can miss the bare prompt; MEMIT's z does not
        assert s["post"]["EM"]["mean"] > s["pre"]["EM"]["mean"]
    assert "GE" not in s["post"]


def test_measure_probabilities_none_equals_direct(tmp_path):
    from conftest import make_tiny_model

    lm = make_tiny_model("gpt2")
    case = load_cases("counterfact", _tiny_counterfact(tmp_path / "cf.json"))[0]
    probs = measure_probabilities(lm, case)
    direct = score_targets(lm, [(case.rewrite_prompt, "Rome"), (case.rewrite_prompt, "Paris")])
    assert probs["rewrite"][0]["nll_new"] == pytest.approx(direct[0].nll)
    assert probs["rewrite"][0]["nll_true"] == pytest.approx(direct[1].nll)
    assert len(probs["neighborhood"]) == 2


def test_summary_markdown_rows():
    base = {"date": "2025-01-01", "n_cases": 2, "seconds_per_edit": 1.5,
            "settings": {"method": "memit", "dataset": "counterfact", "model": "m", "batch_size": 2},
            "pre": {"S": {"mean": 10.0, "std": float("nan")}, "ES": {"mean": 20.0, "std": 1.0}},
            "post": {"S": {"mean": 90.0, "std": float("nan")}, "ES": {"mean": 95.0, "std": 2.0}}}
    md = summary_markdown([base])
    assert "| unedited (pre) | 2 | 10.0 | 20.0 ± 1.0 |" in md
    assert "| memit (batch 2) | 2 | 90.0 | 95.0 ± 2.0 |" in md


# ---------------------------------------------------------------------------- embedded model


@pytest.mark.embedded
def test_embedded_counterfact_probabilities(embedded, shared_data):
    case = load_cases("counterfact", limit=1, data_dir=shared_data)[0]
    probs = measure_probabilities(embedded, case)
    s = case_scores(probs)
    # the unedited model prefers the true object (Ferrari) over Microsoft for the Ferrari F40
    assert s["rewrite_success"] == 0.0 and s["neighborhood_success"] >= 0.8
    direct = score_targets(embedded, [("The Eiffel Tower is located in the city of", "Paris")])[0]
    assert direct.prob == pytest.approx(0.70, abs=0.02)


def test_cli_rejects_bad_batch_size_before_loading(tmp_path, capsys):
    from tracer.cli import main

    assert main(["evaluate", "--method", "rome", "--dataset", "counterfact", "--batch-size", "3", "--out", str(tmp_path)]) == 2
    assert "--batch-size" in capsys.readouterr().err
    from tracer.commands.evaluate import parse_layers

    assert parse_layers("2-6") == (2, 3, 4, 5, 6) and parse_layers("1,3") == (1, 3)
    with pytest.raises(HyperParameterError):
        parse_layers("two")


def test_cli_hparam_overrides_parsed_and_checked(tmp_path, capsys):
    from tracer.cli import main
    from tracer.commands.evaluate import parse_hparams
    from tracer.evaluate.methods import FTLHyperParams, check_overrides, make_method

    assert parse_hparams(["norm_constraint=5e-3", "layers=[2,3]", "name=abc"]) == {
        "norm_constraint": 5e-3, "layers": (2, 3), "name": "abc"}
    with pytest.raises(HyperParameterError, match="KEY=VALUE"):
        parse_hparams(["norm_constraint"])
    with pytest.raises(HyperParameterError, match="accepted: .*norm_constraint"):
        check_overrides("ft-l", {"epsilon": 1e-3})
    with pytest.raises(HyperParameterError, match="accepted: none"):
        check_overrides("none", {"lr": 1.0})
    # a typo is named before the model is loaded
    assert main(["evaluate", "--method", "memit", "--dataset", "counterfact", "--hparam", "lambda=5",
                 "--out", str(tmp_path)]) == 2
    assert "mom2_weight" in capsys.readouterr().err
    from conftest import make_tiny_model

    editor = make_method("ft-l", make_tiny_model("llama"), layer=1, norm_constraint=5e-3, lr=5e-3)
    assert editor.hp == FTLHyperParams(layer=1, lr=5e-3, norm_constraint=5e-3)


def make_method_layer(lm):
    from tracer.edit import ROMEHyperParams

    return ROMEHyperParams.for_model(lm).layer


def test_eval_table_combines_runs(tmp_path, capsys):
    from conftest import make_tiny_model
    from tracer.cli import main

    lm = make_tiny_model("llama")
    data = _tiny_counterfact(tmp_path / "cf.json")
    opts = {"layer": 1, "steps": 3, "lr": 1e-2, "norm_constraint": 1e-2}
    none = run_evaluation(lm, "none", "counterfact", tmp_path / "none", data_path=data, generation=False, progress=False)
    ftl = run_evaluation(lm, "ft-l", "counterfact", tmp_path / "ftl", data_path=data, generation=False,
                         method_options=opts, progress=False)
    html_path = tmp_path / "table.html"
    assert main(["eval-table", str(tmp_path / "none"), str(tmp_path / "ftl"), "--html", str(html_path)]) == 0
    text = capsys.readouterr().out
    assert f"| unedited | 2 | {none['post']['S']['mean']:.1f} |" in text
    assert f"| ft-l | 2 | {ftl['post']['S']['mean']:.1f} |" in text
    assert html_path.read_text().startswith("<!DOCTYPE") and "<script" not in html_path.read_text()
    assert main(["eval-table", str(tmp_path)]) == 2  # not an evaluation directory
    assert "settings.json" in capsys.readouterr().err
    settings = json.loads((tmp_path / "ftl" / "settings.json").read_text())
    settings["settings"]["dataset"] = "zsre"
    (tmp_path / "zs").mkdir()
    (tmp_path / "zs" / "settings.json").write_text(json.dumps(settings))
    assert main(["eval-table", str(tmp_path / "none"), str(tmp_path / "zs")]) == 2
    assert "different datasets" in capsys.readouterr().err
