"""Evaluation beyond teacher forcing: batched greedy continuations, generation-based efficacy,
CounterFact+ prompts and the neighbourhood KL (tracer.generation, tracer.scoring, tracer.evaluate.metrics)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from float32 import logprob_tol
from tracer.evaluate import Tfidf, load_cases, run_evaluation, summary_markdown
from tracer.evaluate.metrics import (generation_scores, generation_success, greedy_outcomes, mentions,
                                     neighbourhood_kl, plus_prompts, summarize)
from tracer.generation import greedy, stop_ids
from tracer.scoring import next_token_logprobs

PROMPTS = ["The city of Paris is", "A", "The museum is located in the city of"]


def _hf_greedy(lm, prompt: str, n: int) -> str:
    ids = torch.tensor([lm.encode(prompt)])
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            pad_token_id=lm.pad_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_batched_greedy_equals_generate_one_prompt_at_a_time(tiny_lm):
    # one left-padded batch with a key/value cache against transformers' generate on each prompt alone
    assert greedy(tiny_lm, PROMPTS, 12) == [_hf_greedy(tiny_lm, p, 12) for p in PROMPTS]
    assert greedy(tiny_lm, PROMPTS, 12, batch_size=2) == greedy(tiny_lm, PROMPTS, 12)


def test_greedy_stops_at_end_of_sequence():
    lm = make_tiny_model("gpt2")
    ids = lm.encode(PROMPTS[0])
    with torch.no_grad():  # the third greedy token becomes "end of sequence"
        out = lm.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=lm.pad_id)
    third = int(out[0, len(ids) + 2])
    lm.model.generation_config.eos_token_id = third
    assert stop_ids(lm) == {third}
    got = greedy(lm, PROMPTS, 12)
    assert got == [_hf_greedy(lm, p, 12) for p in PROMPTS]
    assert got[0] == lm.tokenizer.decode(out[0, len(ids):len(ids) + 3])  # ends with the stop token (not special here)
    assert len(greedy(lm, PROMPTS[:1], 12)[0]) < len(greedy(make_tiny_model("gpt2"), PROMPTS[:1], 12)[0])


def test_next_token_logprobs_equal_one_unpadded_forward(tiny_lm):
    got = next_token_logprobs(tiny_lm, PROMPTS, batch_size=2)
    assert got.shape == (3, tiny_lm.model.get_output_embeddings().weight.shape[0]) and got.dtype == torch.float32
    width = max(len(tiny_lm.encode(p)) for p in PROMPTS)
    for row, prompt in zip(got, PROMPTS):
        with torch.no_grad():
            logits = tiny_lm.model(input_ids=torch.tensor([tiny_lm.encode(prompt)])).logits[0, -1].float()
        want = torch.log_softmax(logits, -1)
        np.testing.assert_allclose(row.numpy(), want.numpy(), atol=logprob_tol(tiny_lm, width, float(want.abs().max())),
                                   rtol=0)
    assert math.isclose(float(got.exp().sum(-1)[0]), 1.0, abs_tol=1e-4)


def test_mentions_whole_words_any_case():
    assert mentions("It was made by Microsoft in 1990", "Microsoft")
    assert mentions("it was made by MICROSOFT.", " Microsoft")
    assert not mentions("Microsoftware is not it", "Microsoft")
    assert mentions("He lived in New York City", "New York") and not mentions("anything", "  ")
    assert generation_success("developed by Microsoft and Sony", "Microsoft", "Ferrari")
    assert not generation_success("developed by Microsoft, not Ferrari", "Microsoft", "Ferrari")
    assert not generation_success("developed by Ferrari", "Microsoft", "Ferrari")


def _case(shared_data, i=0):
    return load_cases("counterfact", limit=i + 1, data_dir=shared_data)[i]


def test_plus_prompts_state_the_edit_first(shared_data):
    case = _case(shared_data)
    plus = plus_prompts(case)
    assert len(plus) == len(case.neighborhood_prompts) == 10
    assert plus[0] == f"{case.rewrite_prompt} {case.target_new}. {case.neighborhood_prompts[0]}"
    assert plus[0].startswith("Ferrari F40, developed by Microsoft. ")
    zsre = load_cases("zsre", limit=1, data_dir=shared_data)[0]
    assert plus_prompts(zsre) == []


def test_generation_scores_are_shares_of_continuations(shared_data):
    case = _case(shared_data)  # Ferrari F40: Ferrari -> Microsoft
    texts = {"rewrite": [" Microsoft in 1992."], "paraphrase": [" Ferrari.", " Microsoft, then Ferrari", " Microsoft"]}
    assert generation_scores(texts, case) == {"rewrite_gen_success": 1.0, "paraphrase_gen_success": pytest.approx(1 / 3)}


def test_neighbourhood_kl_known_values():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]]).log()
    q = torch.tensor([[0.25, 0.5, 0.25], [0.9, 0.05, 0.05]]).log()
    want = (0.5 * math.log(2) + 0.25 * math.log(0.5)) / 2  # second prompt unchanged: KL 0
    assert neighbourhood_kl(p, q) == pytest.approx(want, rel=1e-6)
    assert neighbourhood_kl(p, p) == 0.0
    s = summarize([{"rewrite_success": 1.0, "paraphrase_success": 1.0, "neighborhood_success": 1.0,
                    "neighborhood_kl": 0.02}, {"rewrite_success": 1.0, "paraphrase_success": 1.0,
                                               "neighborhood_success": 1.0, "neighborhood_kl": 0.04}])
    assert s["NKL"]["mean"] == pytest.approx(0.03)  # in nats, not × 100
    assert s["ES"]["mean"] == 100.0


def _tiny_counterfact(path):
    rec = {
        "case_id": 7, "pararel_idx": 0,
        "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P1", "subject": "The tower",
                              "target_new": {"str": "Rome", "id": "Q1"}, "target_true": {"str": "Paris", "id": "Q2"}},
        "paraphrase_prompts": ["People say that The tower is in", "The tower, a landmark, is in"],
        "neighborhood_prompts": ["The museum is located in", "The bridge is located in"],
        "attribute_prompts": ["The forum is located in"],
        "generation_prompts": ["The tower is famous for"],
    }
    path.write_text(json.dumps([rec, {**rec, "case_id": 8}]))
    return path


def test_harness_reports_generation_and_counterfact_plus(tmp_path):
    lm = make_tiny_model("llama")
    data = _tiny_counterfact(tmp_path / "cf.json")
    tfidf = Tfidf.fit(["The forum is located in Rome", "Paris is a city"])
    opts = {"layer": 1, "steps": 5, "lr": 1e-2, "norm_constraint": 1e-2}
    s = run_evaluation(lm, "ft-l", "counterfact", tmp_path / "ftl", data_path=data, tfidf=tfidf, generation_length=16,
                       method_options=opts, progress=False, greedy_tokens=6)
    assert s["settings"]["greedy_tokens"] == 6
    for phase in ("pre", "post"):
        assert {"ES-g", "PS-g", "NS+", "NM+", "NKL"} <= set(s[phase])
    assert s["pre"]["NKL"]["mean"] == 0.0 and s["post"]["NKL"]["mean"] > 0  # fine-tuning moved the neighbours
    case = json.loads((tmp_path / "ftl" / "cases" / "7.json").read_text())
    c = load_cases("counterfact", data)[0]
    for phase in ("pre", "post"):  # the stored continuations are the model's greedy ones, and the scores theirs
        texts = case[phase]["greedy"]
        assert len(texts["rewrite"]) == 1 and len(texts["paraphrase"]) == 2
        assert case[phase]["scores"]["rewrite_gen_success"] == float(generation_success(texts["rewrite"][0], "Rome", "Paris"))
        assert len(case[phase]["probs"]["neighborhood_plus"]) == 2
    assert case["pre"]["greedy"] == greedy_outcomes(lm, [c], 6)[0]  # the model is back to its weights
    header = summary_markdown([s]).splitlines()[0]
    assert header.endswith("| ES-g | PS-g | NS+ | NKL | s / edit |")
    row = next(line for line in summary_markdown([s]).splitlines() if line.startswith("| ft-l |"))
    assert f"{s['post']['NKL']['mean']:.3f} ± " in row
    none = run_evaluation(lm, "none", "counterfact", tmp_path / "none", data_path=data, generation=False,
                          progress=False, greedy_tokens=0)
    assert none["post"]["NKL"]["mean"] == 0.0 and "ES-g" not in none["post"] and none["post"]["NS+"] == none["pre"]["NS+"]


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_rome_generation_efficacy(embedded, shared_data):
    """One CounterFact edit on the embedded model: teacher forcing and greedy text agree that the
    rewrite prompt now says Microsoft (record 0, Ferrari F40), and the neighbours moved (NKL > 0)."""
    from tracer.evaluate import make_method

    case = _case(shared_data)
    before = greedy_outcomes(embedded, [case])[0]
    assert generation_scores(before, case)["rewrite_gen_success"] == 0.0
    editor = make_method("rome", embedded)
    pre = torch.cat([next_token_logprobs(embedded, plus_prompts(case))])
    handle = editor.apply(embedded, [case])
    try:
        after = greedy_outcomes(embedded, [case])[0]
        post = next_token_logprobs(embedded, plus_prompts(case))
    finally:
        editor.revert(embedded, handle)
    assert generation_scores(after, case)["rewrite_gen_success"] == 1.0, after
    assert 0 < neighbourhood_kl(pre, post) < 5
