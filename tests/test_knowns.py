"""tracer.knowns: loading facts files, batched greedy answers, the known-fact rule."""
from __future__ import annotations

import json

import pytest
import torch

from float32 import prob_tol
from tracer.errors import DatasetError
from tracer.knowns import RULE, KnownFacts, filter_known, greedy_next, load_facts, target_token


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_greedy_equals_one_prompt_at_a_time(family):
    from conftest import make_tiny_model

    lm = make_tiny_model(family, n_layers=2)
    prompts = ["The city of London is", "Paris", "He swam in the river and then went home", "music was"]
    ids, probs = greedy_next(lm, prompts, batch_size=3, progress=False)  # padding inside each batch
    # a padded batch against one unpadded row: other shapes, so float32 sums in other orders along
    # the whole path (tests/float32.py); attention runs over the batch's padded width
    width = max(len(lm.encode(p)) for p in prompts[:3])
    for prompt, got, p in zip(prompts, ids, probs):
        with torch.no_grad():
            logits = lm.model(torch.tensor([lm.encode(prompt)])).logits[0, -1]
        assert got == int(logits.argmax())
        assert p == pytest.approx(float(torch.softmax(logits, -1).max()), abs=prob_tol(lm, width))


def test_load_facts_formats_and_errors(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"subject": "Paris", "template": "{} is in", "attribute": "France"}]))
    facts = load_facts(plain)
    assert facts == [{"subject": "Paris", "template": "{} is in", "attribute": "France", "prompt": "Paris is in",
                      "known_id": 0}]
    wrapped = tmp_path / "wrapped.json"
    KnownFacts(model="m", rule=RULE, source="s", source_md5="x", n_checked=3, facts=facts).save(wrapped)
    assert load_facts(wrapped) == facts
    assert KnownFacts.load(wrapped).to_dict()["filter"]["n_known"] == 1
    cases = {"[1]": "record 0 is a int", '[{"prompt": "x"}]': "no 'subject'", '{"a": 1}': "JSON list",
             '[{"subject": "a", "template": "no slot"}]': "template",
             '[{"subject": "a", "prompt": "a", "known_id": 1}, {"subject": "a", "prompt": "a", "known_id": 1}]':
                 "duplicate known_id", "not json": "not valid JSON"}
    for text, message in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(DatasetError, match=message):
            load_facts(bad)
    with pytest.raises(DatasetError, match="does not exist"):
        load_facts(tmp_path / "missing.json")


@pytest.mark.embedded
def test_known_facts_of_the_embedded_model(embedded, shared_data, tmp_path):
    facts = json.loads((shared_data / "known_1000.json").read_text())[:8]
    assert facts[6]["prompt"] == "Catalonia belongs to the continent of"
    wrong = {**facts[6], "known_id": "wrong", "attribute": "Asia"}  # the model says Europe
    known = filter_known(embedded, facts + [wrong], progress=False)
    assert known.rule == RULE and known.n_checked == 9 and known.model == "smollm2-135m"
    kept = {f["known_id"] for f in known.facts}
    assert 6 in kept and "wrong" not in kept
    # the rule, checked independently: one unbatched forward per prompt, attribute encoded alone
    for fact in facts:
        ids = embedded.encode(fact["prompt"])
        with torch.no_grad():
            top = int(embedded.model(torch.tensor([ids])).logits[0, -1].argmax())
        first = embedded.tokenizer(" " + fact["attribute"], add_special_tokens=False)["input_ids"][0]
        assert target_token(embedded, fact["prompt"], fact["attribute"]) == first
        assert (fact["known_id"] in kept) == (top == first), fact["prompt"]
    record = next(f for f in known.facts if f["known_id"] == 6)
    assert record["answer"] == " Europe" and 0 < record["answer_prob"] <= 1
    path = tmp_path / "knowns.json"
    known.save(path)
    assert [f["known_id"] for f in load_facts(path)] == [f["known_id"] for f in facts if f["known_id"] in kept]


def test_cli_writes_known_facts_with_the_rule(tmp_path, capsys):
    from conftest import make_tiny_model

    from tracer.cli import main

    lm = make_tiny_model("gpt2", n_layers=2)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    prompts = ["The city of London is", "Paris is the capital of", "The music was"]
    answers, _ = greedy_next(lm, prompts, progress=False)
    facts = [{"known_id": i, "subject": p.split()[1], "prompt": p, "attribute": lm.decode(a).strip() or "x"}
             for i, (p, a) in enumerate(zip(prompts, answers))]
    facts.append({"known_id": 9, "subject": "city", "prompt": prompts[0], "attribute": "zzzz"})
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    out = tmp_path / "knowns.json"
    code = main(["knowns", "--model", str(tmp_path / "model"), "--facts", str(tmp_path / "facts.json"),
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["filter"]["rule"] == RULE and saved["filter"]["n_checked"] == 4
    kept = [f["known_id"] for f in saved["facts"]]
    assert 9 not in kept
    for f in facts[:3]:
        assert (f["known_id"] in kept) == (target_token(lm, f["prompt"], f["attribute"]) == answers[f["known_id"]])
    assert f"{len(kept)} of 4 facts known" in capsys.readouterr().out
    assert main(["knowns", "--model", str(tmp_path / "model"), "--facts", str(tmp_path / "none.json"),
                 "--out", str(out), "--device", "cpu"]) == 2
