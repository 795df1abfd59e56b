"""tracer/progress.py: the engine's bars report every step to a watcher; stop cancels between steps, leaving no trace."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import make_tiny_model
from tracer.errors import Cancelled, FactscopeError
from tracer.hooks import active_hook_count, hooked
from tracer.progress import Step, tqdm, watching
from tracer.trace import trace_all

PROMPT, SUBJECT = "The Eiffel Tower is in Paris", "Eiffel Tower"


@pytest.fixture(scope="module")
def lm():
    return make_tiny_model("llama")


def test_bars_report_each_step_to_the_watcher_also_when_hidden(lm):
    steps: list[Step] = []
    with watching(lm, on_step=steps.append):
        assert list(tqdm(range(3), desc="loop", disable=True)) == [0, 1, 2]
        bar = tqdm(total=5, desc="manual", disable=True)
        bar.update(2)
        bar.update(3)
        bar.close()
    assert steps == [Step("loop", 0, 3), Step("loop", 1, 3), Step("loop", 2, 3), Step("loop", 3, 3),
                     Step("manual", 0, 5), Step("manual", 2, 5), Step("manual", 5, 5)]
    assert active_hook_count(lm.model) == 0
    steps.clear()
    list(tqdm(range(2), disable=True))  # outside the block: nobody is told
    assert steps == []


def test_a_trace_reports_its_batches(lm):
    steps: list[Step] = []
    with watching(lm, on_step=steps.append):
        result = trace_all(lm, PROMPT, SUBJECT, kinds=("mlp",), samples=2, noise=0.5, progress=False)["mlp"]
    mine = [s for s in steps if s.desc == "trace mlp"]
    assert mine[0].n == 0 and mine[-1].n == mine[-1].total > 0
    assert [s.n for s in mine] == list(range(mine[-1].total + 1))
    assert result.n_forward >= mine[-1].total


def test_stop_cancels_at_the_next_block_and_removes_its_hooks(lm):
    """Stop set during a forward pass (from a hook on the first block): the pass ends at the end of
    that block with Cancelled; the blocks above it never run, and no hook stays on the model."""
    stop = threading.Event()
    ran: list[int] = []
    seen = {lm.layers.block_name(i): (lambda h, i=i: ran.append(i) or (stop.set() if i == 0 else None))
            for i in range(lm.n_layers)}
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with hooked(lm.model, outputs=seen):  # installed first, so it runs first in each block
        with pytest.raises(Cancelled, match="cancelled"):
            with watching(lm, stop=stop):
                lm.model(input_ids=ids)
    assert ran == [0] and lm.n_layers > 1
    assert active_hook_count(lm.model) == 0
    assert issubclass(Cancelled, FactscopeError)  # panels and the CLI show it as one line


def test_stop_set_before_the_block_cancels_at_once(lm):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        with watching(lm, stop=stop):
            pytest.fail("the block must not run once stop is set")


def test_a_cancelled_trace_leaves_the_model_as_it_was(lm):
    """Cancel from the progress callback in the middle of a trace: Cancelled, the weights and the
    model's outputs are the same as before, and the same trace afterwards gives the same scores."""
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    reference = trace_all(lm, PROMPT, SUBJECT, kinds=("hidden",), samples=2, noise=0.5, progress=False)["hidden"]
    stop = threading.Event()

    def on_step(step: Step) -> None:
        if step.n == 1:
            stop.set()

    with pytest.raises(Cancelled):
        with watching(lm, on_step=on_step, stop=stop):
            trace_all(lm, PROMPT, SUBJECT, kinds=("hidden",), samples=2, noise=0.5, progress=False)
    assert active_hook_count(lm.model) == 0
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    again = trace_all(lm, PROMPT, SUBJECT, kinds=("hidden",), samples=2, noise=0.5, progress=False)["hidden"]
    assert (again.scores == reference.scores).all()


def test_watchers_belong_to_their_thread(lm):
    """A watcher entered in one thread is not told of bars in another (a panel's worker watches its own work)."""
    steps: list[Step] = []
    with watching(lm, on_step=steps.append):
        t = threading.Thread(target=lambda: list(tqdm(range(4), desc="elsewhere", disable=True)))
        t.start()
        t.join()
    assert steps == []
