"""MEMIT through a post-MLP norm (Gemma 3): the nearest reachable output, and MEMIT/AlphaEdit on tiny Gemma."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import make_tiny_model
from tracer.edit import MemitHyperParams, Request, WeightBook, compute_memit
from tracer.edit.alphaedit import compute_alphaedit
from tracer.edit.hparams import AlphaEditHyperParams
from tracer.edit.keys import key_rows
from tracer.edit.memit import keys_and_z
from tracer.edit.post_norm import PostNorm
from tracer.edit.zs import compute_zs
from tracer.errors import HyperParameterError
from tracer.hooks import hooked
from tracer.scoring import score_targets
from tracer.targets import spaced

REQS = [Request("Paris", "{} is the capital of", "Germany"), Request("the cat", "I saw {} in", "the garden"),
        Request("Rome", "The city of {} is in", "Spain")]
LAYERS = (1, 2)


@pytest.fixture(scope="module")
def gemma():
    lm = make_tiny_model("gemma3_text")
    with torch.no_grad():  # a gain that is not all ones, as in a trained model
        for l in range(lm.n_layers):
            norm = lm.model.get_submodule(lm.layers.mlp_post_norm_name(l))
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(l)) * 0.5)
    return lm


def _statistics(lm):
    d_k = lm.model.get_submodule(lm.layers.mlp_out_name(1)).weight.shape[1]
    return {l: (torch.eye(d_k, dtype=torch.float64), {"kind": "given"}) for l in LAYERS}


def test_gain_and_forward_are_the_modules(gemma):
    post = PostNorm.of(gemma, 1)
    module = gemma.model.get_submodule(gemma.layers.mlp_post_norm_name(1))
    torch.testing.assert_close(post.gain, (1 + module.weight.detach().double()) / (1 + module.eps) ** 0.5)
    m = torch.randn(4, gemma.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        torch.testing.assert_close(post.forward(m).float(), module(m), rtol=1e-5, atol=1e-5)


def test_a_reachable_target_is_met_exactly(gemma):
    post = PostNorm.of(gemma, 2)
    g = torch.Generator().manual_seed(2)
    m, other = torch.randn(3, gemma.hidden_size, generator=g), 2 * torch.randn(3, gemma.hidden_size, generator=g)
    resid = post.forward(other) - post.forward(m)  # an output the norm can give
    delta, shortfall = post.targets(m, resid)
    got = post.forward(m.double() + delta)
    assert float(((got - post.forward(other)).norm(dim=-1) / resid.norm(dim=-1)).max()) <= 1e-8
    assert float(shortfall.max()) <= 1e-8
    # the new output keeps the old one's scale (rms(m') = rms(m))
    torch.testing.assert_close((m.double() + delta).pow(2).mean(-1), m.double().pow(2).mean(-1))


def test_an_unreachable_target_gets_the_nearest_output(gemma):
    """t off the set {g ⊙ x : rms(x) = 1}: the result is no farther from t than any nearby point of
    that set, and its distance is the reported shortfall."""
    post = PostNorm.of(gemma, 1)
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(2, gemma.hidden_size, generator=gen, dtype=torch.float64)
    resid = 0.7 * torch.randn(2, gemma.hidden_size, generator=gen, dtype=torch.float64) * post.gain.abs()
    delta, shortfall = post.targets(m, resid)
    t = post.forward(m) + resid
    best = (post.forward(m + delta) - t).norm(dim=-1)
    torch.testing.assert_close(best / resid.norm(dim=-1), shortfall)
    assert float(shortfall.min()) > 1e-3  # really unreachable
    for scale in (1e-1, 1e-2, 1e-3):
        x = m + delta + scale * torch.randn(200, *m.shape, generator=gen, dtype=torch.float64)
        others = (post.forward(x.reshape(-1, m.shape[1])).reshape(x.shape) - t).norm(dim=-1)
        assert bool((others >= best - 1e-9).all())


def test_families_without_a_post_norm_have_none():
    lm = make_tiny_model("llama")
    assert lm.layers.mlp_post_norm_name(1) is None
    with pytest.raises(HyperParameterError, match="no post-MLP norm"):
        PostNorm.of(lm, 1)


def _target_logprob(lm) -> list[float]:
    return [sum(s.logprobs) for s in score_targets(lm, [(r.text, spaced(r.target_new)) for r in REQS])]


def _memit(lm, hp):
    """(distance of the edited block output to z over the distance before, per request; the gain in
    the targets' log-probabilities; the record), reverted bit-exactly before returning."""
    weights = [lm.model.get_submodule(lm.layers.mlp_out_name(l)).weight for l in LAYERS]
    before_w = [w.detach().clone() for w in weights]
    templates = ("{}",)
    z = compute_zs(lm, REQS, hp, templates, progress=False).z
    rows = key_rows(lm, REQS, templates)
    h0, before = keys_and_z(lm, rows, LAYERS[0], LAYERS[-1], batch_rows=8)[1], _target_logprob(lm)
    record = compute_memit(lm, REQS, hp, statistics=_statistics(lm), templates=templates, progress=False)
    h1, after = keys_and_z(lm, rows, LAYERS[0], LAYERS[-1], batch_rows=8)[1], _target_logprob(lm)
    WeightBook.of(lm).revert(record)
    assert all(torch.equal(w, b) for w, b in zip(weights, before_w))
    return (h1 - z).norm(dim=-1) / (h0 - z).norm(dim=-1), sum(after) - sum(before), record


def test_memit_on_tiny_gemma_carries_the_residual_through_the_norm(gemma):
    """The batch moves every request's block output toward its z, and much further than writing the
    residual share as the MLP output itself (what MEMIT does in the other families) would; the
    targets become more likely; the record reverts bit-exactly."""
    hp = MemitHyperParams(layers=LAYERS, v_steps=25, mom2_weight=0.1)
    ratio, gain, record = _memit(gemma, hp)
    layers = gemma.layers
    try:
        gemma.layers = replace(layers, mlp_post_norm="")  # the residual share written as m itself
        naive_ratio, naive_gain, _ = _memit(gemma, hp)
    finally:
        gemma.layers = layers
    assert bool((ratio < 0.5).all()) and float(ratio.mean()) < 0.3, ratio
    assert bool((ratio < 0.75 * naive_ratio).all()), (ratio, naive_ratio)
    assert gain > 1.5 and gain > naive_gain + 1.0, (gain, naive_gain)
    assert 0 <= record.timings["post_norm_shortfall_mean"] <= record.timings["post_norm_shortfall_max"] < 1


def test_alphaedit_on_tiny_gemma_writes_the_batch_and_reverts_bit_exactly(gemma):
    hp = AlphaEditHyperParams(layers=LAYERS, v_steps=25, nullspace_threshold=1e-9,
                              threshold_mode="relative")
    weights = [gemma.model.get_submodule(gemma.layers.mlp_out_name(l)).weight for l in LAYERS]
    before_w = [w.detach().clone() for w in weights]
    before = _target_logprob(gemma)
    # C from the keys of every token of a preserved text: low rank, so AlphaEdit has a null space
    seen: dict[int, torch.Tensor] = {}
    inputs = {gemma.layers.mlp_out_name(l): (lambda x, l=l: seen.__setitem__(l, x[0].double())) for l in LAYERS}
    with torch.no_grad(), hooked(gemma.model, inputs=inputs):
        gemma.model(torch.tensor([gemma.encode("The weather was mild that year, and music was played in the hall.")]))
    statistics = {l: (k.T @ k / k.shape[0], {"kind": "given", "tokens": k.shape[0]}) for l, k in seen.items()}
    record = compute_alphaedit(gemma, REQS, hp, statistics=statistics, templates=("{}",), progress=False)
    after = _target_logprob(gemma)
    assert sum(after) > sum(before) + 1.5, (before, after)
    WeightBook.of(gemma).revert(record)
    assert all(torch.equal(w, b) for w, b in zip(weights, before_w))
