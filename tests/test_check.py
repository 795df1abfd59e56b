"""check_edit: before = the unedited model, after = with the record applied, model restored."""
from __future__ import annotations

import json
import math

import pytest
import torch
from float32 import logprob_tol

from tracer.edit import EditRequest, ROMEHyperParams, check_edit, edited, rome_edit
from tracer.edit.check import predict
from tracer.errors import EditError, PromptError

REQUEST = EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")


@pytest.fixture
def record(tiny_lm):
    hp = ROMEHyperParams.for_model(tiny_lm, context_template_lengths=((5, 2),), v_num_grad_steps=4)
    return rome_edit(tiny_lm, REQUEST, hp, stats="identity", progress=False)


def test_predict_matches_direct_log_probs(tiny_lm):
    lm = tiny_lm
    prompt, new, true = "The Louvre is in", " Rome is big", " Paris"
    pred = predict(lm, [prompt, "Another prompt of a different length here"], new, true, top_k=3)[0]
    ids = lm.encode(prompt)
    new_ids = lm.tokenizer(new, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids + new_ids])).logits[0].float(), -1)
    expected = sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(new_ids)) / len(new_ids)
    # a padded batch of four rows against one row: float32 sums in other orders (tests/float32.py);
    # |d log p| bounds the relative difference of p as well
    tol = logprob_tol(lm, len(ids) + len(new_ids), abs(expected) + 1)
    assert len(new_ids) > 1 and math.isclose(pred.logp_new, expected, rel_tol=0, abs_tol=tol)
    assert math.isclose(pred.p_new, logp[len(ids) - 1, new_ids[0]].exp().item(), rel_tol=math.expm1(tol))
    assert len(pred.top) == 3 and pred.top[0][0] == pred.top1 and pred.top[0][1] >= pred.top[1][1]
    with pytest.raises(PromptError):
        predict(lm, [""], new, true)


def test_check_edit_before_after_and_restores(tiny_lm, record):
    lm = tiny_lm
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    para, neigh = ["Where is The Eiffel Tower? In"], ["The Louvre is located in the city of"]
    report = check_edit(lm, record, paraphrases=para, neighbours=neigh, prompts=["Paris is"], max_new_tokens=4)
    assert all(torch.equal(state[k], v) for k, v in lm.model.state_dict().items())
    assert [p.kind for p in report.prompts] == ["rewrite", "paraphrase", "neighbour", "check"]
    assert report.prompts[0].prompt == REQUEST.text
    texts = [p.prompt for p in report.prompts]
    before = predict(lm, texts, " Rome", " Paris")
    with edited(lm, [record]):
        after = predict(lm, texts, " Rome", " Paris")
    for p, b, a in zip(report.prompts, before, after):
        assert p.before.p_new == b.p_new and p.after.p_new == a.p_new  # the same batch again: the same bits
    assert report.prompts[0].after.p_new != report.prompts[0].before.p_new
    assert report.efficacy in (0.0, 1.0) and report.neighbourhood_score in (0.0, 1.0)
    assert report.efficacy == float(report.prompts[0].after.logp_new > report.prompts[0].after.logp_true)
    assert len(report.generations) == 2 and report.generations[0].prompt == "The Eiffel Tower is"
    d = json.loads(json.dumps(report.to_dict()))
    assert d["prompts"][0]["kind"] == "rewrite" and "top1" in d["prompts"][0]["after"]
    assert "rewrite" in report.format()


def test_check_edit_rejects_non_records(tiny_lm):
    with pytest.raises(EditError, match="EditRecord"):
        check_edit(tiny_lm, REQUEST)


def test_long_prompts_are_refused_before_any_forward_pass(tiny_lm, record):
    """A paraphrase, check or generation prompt that does not fit the model's positions (with the
    target appended, or the generated tokens) is refused by name before the first pass."""
    calls = []
    handle = tiny_lm.model.get_input_embeddings().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        long = "word " * 200
        n = len(tiny_lm.encode(long))
        with pytest.raises(PromptError, match=rf"paraphrase prompt 2 'word word .* has {n} tokens .* at most 128"):
            check_edit(tiny_lm, record, paraphrases=["The Eiffel Tower stands in", long])
        # a prompt that fits alone, but not with the tokens generated after it
        fits = "word " * 30
        n = len(tiny_lm.encode(fits))
        assert n < 128
        with pytest.raises(PromptError, match=r"generation prompt 1 .* more are needed for the generated tokens"):
            check_edit(tiny_lm, record, generation_prompts=[fits], max_new_tokens=129 - n)
        assert calls == []
    finally:
        handle.remove()


@pytest.mark.parametrize("tiny_lm", ["gpt2", "llama"], indirect=True)
def test_check_edit_and_evaluate_give_the_same_probabilities(tiny_lm, record):
    """The same edit seen by check_edit and by factscope evaluate's measurement: one scorer
    (tracer.scoring.score_targets), the targets tokenised the same way, so the same numbers."""
    from tracer.evaluate import Case, measure_probabilities

    lm = tiny_lm
    paraphrases = ["Where is The Eiffel Tower? It is in", "The Eiffel Tower stands in the city of"]
    neighbours = ["The Louvre is located in the city of"]
    check = check_edit(lm, record, paraphrases=paraphrases, neighbours=neighbours, generation_prompts=[])
    case = Case(case_id=0, dataset="counterfact", subject=REQUEST.subject, prompt=REQUEST.prompt,
                target_new=REQUEST.target_new.strip(), target_true=record.target_true.strip(),
                paraphrase_prompts=tuple(paraphrases), neighborhood_prompts=tuple(neighbours),
                specificity_targets=(record.target_true.strip(),))
    before = measure_probabilities(lm, case)
    with edited(lm, [record]):
        after = measure_probabilities(lm, case)
    rows = [("rewrite", 0), ("paraphrase", 0), ("paraphrase", 1), ("neighborhood", 0)]
    for p, (group, i) in zip(check.prompts, rows):
        for state, measured in (("before", before), ("after", after)):
            pred = getattr(p, state)
            # the same pairs in batches of another composition: float32 sums in other orders only
            assert math.isclose(pred.logp_new, -measured[group][i]["nll_new"], rel_tol=0, abs_tol=1e-5), (p.prompt, state)
            assert math.isclose(pred.logp_true, -measured[group][i]["nll_true"], rel_tol=0, abs_tol=1e-5), (p.prompt, state)
    assert check.efficacy == (after["rewrite"][0]["nll_new"] < after["rewrite"][0]["nll_true"])
