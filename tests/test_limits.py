"""tracer.limits: jobs too large for the machine are refused before heavy work, in one line.

The memory estimate must bound what the engine really holds, refuse absurd jobs, and never refuse
the defaults; prompt lengths are checked (count and limit in the message) wherever a prompt is
tokenised; seeds and counts have one accepted range each.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from tracer import limits
from tracer.trace import estimate_trace, trace
from tracer.errors import HyperParameterError, PromptError
from tracer.generation import sample as generate
from tracer.scoring import score_targets
from tracer.knowns import greedy_next
from tracer.errors import JobTooLargeError
from tracer.limits import (COUNT_LIMITS, SEED_LIMIT, ModelShape, check_count, check_memory,
                           check_prompt_length, check_seed, trace_estimate)
from tracer.noise import resolve_noise
from tracer.subject import tokenize_with_subject

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
LONG = "word " * 200  # 400 tokens for the tiny tokenizer; the tiny models read 128 positions

#: SmolLM2-135M's config (the embedded model): the sizes the defaults must always fit in
SMOLLM2 = ModelShape(n_layers=30, hidden=576, intermediate=1536, heads=9, kv_dim=3 * 64, vocab=49152, max_length=8192,
                     itemsize=4)


@pytest.fixture(scope="module")
def gpt2():
    return make_tiny_model("gpt2")


class _Forwards:
    """Counts forward passes of a model (a pre-hook on its input embeddings, which every pass runs)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, *args):
        self.n += 1

    def close(self):
        self.handle.remove()


def test_prompt_length_message_says_count_and_limit():
    check_prompt_length(128, 128)
    with pytest.raises(PromptError, match=r"the prompt has 129 tokens but the model reads at most 128; shorten it"):
        check_prompt_length(129, 128)
    with pytest.raises(PromptError, match=r"has 120 tokens and 9 more are needed for the target: 129 positions, .* at most 128"):
        check_prompt_length(120, 128, reserve=9, reserved_for="the target")


def test_seed_range_is_numpys():
    assert check_seed(SEED_LIMIT - 1) == 2 ** 32 - 1
    np.random.RandomState(SEED_LIMIT - 1)  # the top of the range is one NumPy accepts
    for bad in (SEED_LIMIT, -1, True, 1.5, "1"):
        with pytest.raises(HyperParameterError, match=r"seed must be a whole number in \[0, 4294967295\]"):
            check_seed(bad)


def test_counts_have_ranges_and_too_large_is_its_own_error():
    lo, hi = COUNT_LIMITS["samples"]
    assert check_count("samples", hi) == hi and check_count("samples", np.int64(lo)) == lo
    with pytest.raises(JobTooLargeError, match=f"samples={hi + 1} is more than the {hi}"):
        check_count("samples", hi + 1)
    with pytest.raises(HyperParameterError, match=r"samples must be a whole number in \[1, "):
        check_count("samples", 0)
    assert issubclass(JobTooLargeError, HyperParameterError)


def test_check_memory_compares_estimate_with_available():
    est = limits.Estimate("this job", 2_000_000, (("a", 1_500_000), ("b", 500_000)))
    check_memory(est, available=2_000_000)
    with pytest.raises(JobTooLargeError, match=r"this job needs about 2.0 MB of cpu memory \(largest part: a 1.5 MB\) "
                                               r"but 1.0 MB is available; lower x"):
        check_memory(est, available=1_000_000, hint="lower x")
    assert limits.available_memory("cpu") > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("severed", [None, "mlp"])
def test_trace_estimate_bounds_what_the_engine_holds(family, severed):
    """The noise, clean and corrupted parts are at least the bytes of the tensors _prepare keeps."""
    from tracer.trace import _prepare

    lm = make_tiny_model(family)
    ids, span = tokenize_with_subject(lm.tokenizer, PROMPT, SUBJECT, lm.max_length)
    spec = resolve_noise(lm, 0.5)
    kinds = ("hidden",)
    run = _prepare(lm, ids, span, spec, 7, 1, kinds, severed)
    est = trace_estimate(ModelShape.of(lm), n_tokens=len(ids), subject=span, samples=7, n_kinds=len(kinds),
                         severed=severed is not None)
    parts = dict(est.parts)
    held_states = sum(v.nbytes for v in run.corrupted.values()) + sum(k.nbytes + v.nbytes for k, v in run.kv)
    assert parts["corrupted states"] == held_states  # exact: the same arrays, counted by shape
    assert parts["noise"] == 2 * run.noise.nbytes
    assert parts["clean states"] >= sum(v.nbytes for v in run.clean.values())
    assert est.bytes == sum(parts.values()) and est.work > 0


def test_defaults_are_never_refused_and_absurd_jobs_are():
    """The embedded model's defaults (10 samples, a 12-token prompt, all kinds) need well under 1 GB."""
    default = trace_estimate(SMOLLM2, n_tokens=12, subject=(1, 4), samples=10, n_kinds=3)
    assert default.bytes < 1e9
    long_prompt = trace_estimate(SMOLLM2, n_tokens=1000, subject=(1, 4), samples=10, n_kinds=3)
    assert long_prompt.bytes < 4e9
    absurd = trace_estimate(SMOLLM2, n_tokens=12, subject=(1, 4), samples=20_000_000, n_kinds=1)
    assert absurd.bytes > 1e13  # ~27 TB of corrupted states alone: no machine holds it
    # memory grows linearly in samples (every large part is per sample)
    ten, twenty = (trace_estimate(SMOLLM2, n_tokens=12, subject=(1, 4), samples=s, batch_tokens=10 ** 9).bytes
                   for s in (1000, 2000))
    assert 1.9 < twenty / ten <= 2.0


def test_trace_refuses_before_any_forward_pass(gpt2, monkeypatch):
    """Refused when the estimate exceeds what is available; the same job runs when it fits."""
    need = estimate_trace(gpt2, PROMPT, SUBJECT, ("hidden",), samples=50).bytes
    monkeypatch.setattr(limits, "available_memory", lambda device: need - 1)
    forwards = _Forwards(gpt2.model)
    try:
        with pytest.raises(JobTooLargeError, match=r"this trace needs about .* but .* is available; lower samples \(50\)"):
            trace(gpt2, PROMPT, SUBJECT, samples=50, noise=0.5, progress=False)
        assert forwards.n == 0
        monkeypatch.setattr(limits, "available_memory", lambda device: need)
        trace(gpt2, PROMPT, SUBJECT, samples=50, noise=0.5, progress=False)
        assert forwards.n > 0
    finally:
        forwards.close()


def test_trace_refuses_absurd_sizes_and_seeds(gpt2):
    with pytest.raises(JobTooLargeError, match=r"samples=20000000 is more than the 100000"):  # its range, first
        trace(gpt2, PROMPT, SUBJECT, samples=20_000_000, noise=0.5, progress=False)
    with pytest.raises(HyperParameterError, match="seed must be"):
        trace(gpt2, PROMPT, SUBJECT, samples=2, noise=0.5, seed=2 ** 32, progress=False)
    with pytest.raises(JobTooLargeError, match="batch_tokens="):
        trace(gpt2, PROMPT, SUBJECT, samples=2, noise=0.5, batch_tokens=2 ** 40, progress=False)
    r = trace(gpt2, PROMPT, SUBJECT, samples=2, noise=0.5, seed=2 ** 32 - 1, progress=False)
    assert r.seed == 2 ** 32 - 1 and np.isfinite(r.scores).all()


def test_knowns_check_every_prompt_before_the_first_batch(gpt2):
    n = len(gpt2.encode(LONG))
    forwards = _Forwards(gpt2.model)
    try:
        with pytest.raises(PromptError, match=rf"prompt 40 'word word .* has {n} tokens but the model reads at most 128"):
            greedy_next(gpt2, [PROMPT] * 40 + [LONG], batch_size=8, progress=False)
        assert forwards.n == 0
    finally:
        forwards.close()


def test_scoring_and_generation_check_lengths_and_seeds(gpt2):
    with pytest.raises(PromptError, match=r"prompt 'word word .* with target ' Paris' has \d+ tokens .* at most 128"):
        score_targets(gpt2, [(PROMPT, " Paris"), (LONG, " Paris")])
    with pytest.raises(PromptError, match=r"generation prompt 2 .* at most 128"):
        generate(gpt2, [PROMPT, LONG], max_length=20)
    with pytest.raises(HyperParameterError, match="max_length=500 is more than the 128 positions"):
        generate(gpt2, [PROMPT], max_length=500)
    with pytest.raises(HyperParameterError, match="seed must be"):
        generate(gpt2, [PROMPT], max_length=20, seed=2 ** 32)
    with pytest.raises(HyperParameterError, match="top_k=100000 is more than"):
        generate(gpt2, [PROMPT], max_length=20, top_k=100_000)


def test_scoring_refuses_a_batch_that_cannot_fit(gpt2, monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda device: 1000)
    with pytest.raises(JobTooLargeError, match=r"scoring one batch needs about .* lower batch_size \(64\)"):
        score_targets(gpt2, [(PROMPT, " Paris")])


def test_memory_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv("FACTSCOPE_MEMORY_LIMIT", "1.5GB")
    assert limits.memory_cap() == 1_500_000_000 and limits.available_memory("cpu") <= 1_500_000_000
    for raw, want in (("2000000", 2_000_000), ("500 MB", 500_000_000), ("4k", 4000)):
        monkeypatch.setenv("FACTSCOPE_MEMORY_LIMIT", raw)
        assert limits.memory_cap() == want
    for bad in ("lots", "-1GB", "0", "nan"):
        monkeypatch.setenv("FACTSCOPE_MEMORY_LIMIT", bad)
        with pytest.raises(HyperParameterError, match="FACTSCOPE_MEMORY_LIMIT=.* is not a size"):
            limits.memory_cap()
    monkeypatch.delenv("FACTSCOPE_MEMORY_LIMIT")
    assert limits.memory_cap() is None


def _cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "tracer.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("extra,message", [
    # a count beyond its range is refused before the model loads
    (["--samples", "20000000"], r"--samples=20000000 is more than the 100000 factscope accepts; use a value in \[1, 100000\]"),
    # within the range but more memory than allowed: the estimate and the limit
    (["--samples", "5000", "--memory", "50MB"],
     r"this trace needs about [\d.]+ (MB|GB) of cpu memory \(largest part: .*\) but 50.0 MB is available; lower samples \(5000\)"),
    (["--seed", "4294967296"], r"--seed must be a whole number in \[0, 4294967295\]"),
    (["--prompt", LONG + "The Eiffel Tower"], r"the prompt has \d+ tokens but the model reads at most 128"),
])
def test_cli_trace_refuses_in_one_line(tiny_model_dir, extra, message):
    import re

    base = {"--prompt": PROMPT, "--samples": "2"}
    for flag, value in zip(extra[::2], extra[1::2]):
        base[flag] = value
    env = {"FACTSCOPE_MEMORY_LIMIT": base.pop("--memory")} if "--memory" in base else {}
    args = ["trace", "--model", str(tiny_model_dir), "--device", "cpu", "--subject", SUBJECT, "--noise", "0.5"]
    for flag, value in base.items():
        args += [flag, value]
    proc = _cli(*args, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("factscope trace: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.embedded
def test_cli_trace_embedded_refuses_too_large_jobs():
    import re

    for samples, message in (("20000000", r"--samples=20000000 is more than the 100000"),
                             ("100000", r"this trace needs about ([\d.]+) GB of cpu memory")):
        proc = _cli("trace", "--prompt", PROMPT, "--subject", SUBJECT, "--samples", samples, "--device", "cpu",
                    env={"FACTSCOPE_MEMORY_LIMIT": "100GB"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("factscope trace: error:")]
        found = re.search(message, errors[0]) if len(errors) == 1 else None
        assert found, proc.stderr[-2000:]
        if found.groups():  # 100,000 samples x 10 tokens: 115 GB of corrupted states and keys/values alone
            assert float(found.group(1)) > 115


def test_forward_bytes_counts_attention_scores_only_when_materialised():
    eager = ModelShape(**{**SMOLLM2.__dict__, "eager_attention": True})
    fused, full = limits.forward_bytes(SMOLLM2, 2, 100), limits.forward_bytes(eager, 2, 100)
    assert full - fused == 2 * 2 * 9 * 100 * 100 * 4  # rows x heads x positions^2, input and output
    assert torch.float32.itemsize == SMOLLM2.itemsize
