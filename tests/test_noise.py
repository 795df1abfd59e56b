"""tracer/noise.py: noise scales and draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from tracer.errors import HyperParameterError
from tracer.noise import corrupt, draw_noise, known_subjects, resolve_noise, shipped_std, subject_embedding_std
from tracer.trace_result import NoiseSpec


def test_rome_mode_is_the_original_draw():
    spec = NoiseSpec(scale=0.35, mode="rome")
    noise = draw_noise(spec, samples=10, n_tokens=3, hidden=8, seed=1)
    expected = np.random.RandomState(1).randn(10, 3, 8) * 0.35
    np.testing.assert_array_equal(noise.numpy(), expected)
    uniform = draw_noise(NoiseSpec(scale=2.0, distribution="uniform"), 2, 3, 4, seed=1)
    np.testing.assert_array_equal(uniform.numpy(), np.random.RandomState(1).uniform(-1, 1, (2, 3, 4)) * 2.0)


def test_torch_mode_is_seeded():
    spec = NoiseSpec(scale=1.0, mode="torch")
    a, b = draw_noise(spec, 4, 2, 8, seed=7), draw_noise(spec, 4, 2, 8, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, draw_noise(spec, 4, 2, 8, seed=8))
    assert abs(float(draw_noise(spec, 100, 10, 64, seed=0).std()) - 1.0) < 0.02


def test_corrupt_adds_in_float64_then_rounds():
    emb = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    noise = torch.tensor([[1e-9, 0.5]], dtype=torch.float64)
    assert corrupt(emb, noise, replace=False).dtype == torch.float32
    assert torch.equal(corrupt(emb, noise, replace=False), torch.tensor([[1.0, 2.5]]))
    assert torch.equal(corrupt(emb, noise, replace=True), noise.float())


def test_resolve_multiples_and_errors():
    lm = make_tiny_model("gpt2")
    std = subject_embedding_std(lm)
    spec = resolve_noise(lm, "3s")
    assert spec.multiple == 3.0 and spec.scale == 3 * std  # the same estimate, computed again: the same bits
    assert resolve_noise(lm, "0.25").scale == 0.25 and resolve_noise(lm, 0.1).multiple is None
    with pytest.raises(HyperParameterError):
        resolve_noise(lm, "3x")
    with pytest.raises(HyperParameterError):
        resolve_noise(lm, True)


@pytest.mark.embedded
def test_shipped_std_matches_estimate(embedded):
    assert len(known_subjects()) == 1209
    # torch's CPU std accumulates float32 input in float64 (~2e6 entries: gamma(2e6, 2**-53) ~ 2e-10)
    # and rounds the result to float32 (2**-24 ~ 6e-8 relative): two machines agree to ~1.2e-7 < 1e-6
    assert shipped_std(embedded) == pytest.approx(subject_embedding_std(embedded), rel=1e-6)
    # the golden trace used 3 x the std over the first 100 subjects: the same estimator
    assert 3 * subject_embedding_std(embedded, known_subjects()[:100]) == pytest.approx(0.3535040616989136, rel=1e-6)


@pytest.mark.embedded
def test_gemma_shipped_std_matches_estimate(gemma):
    # the same estimator as test_shipped_std_matches_estimate, on Gemma 3's scaled embeddings
    assert shipped_std(gemma) == pytest.approx(subject_embedding_std(gemma), rel=1e-6)
    assert shipped_std(gemma) == 1.0311975479125977 and resolve_noise(gemma, "3s").scale == 3 * shipped_std(gemma)
