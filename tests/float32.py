"""Tolerances for float32 results, derived from the arithmetic, not fitted to one machine's output.

A sum or dot product of ``n`` terms computed in floating point, in *any* order, lies within
``gamma(n) x sum(|terms|)`` of the exact value, ``gamma(n) = n u / (1 - n u)`` (Higham, *Accuracy
and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and §3.1), with the unit roundoff
``u = 2**-24`` for float32 (``2**-53`` for float64). Two evaluations that add in different orders
(another CPU's vector width, another thread count, another batch shape, a key/value cache instead
of the full sequence) can therefore differ by twice that. Which order a machine uses is not ours to
choose, so a test comparing two such evaluations must allow this much and no test may assume a
particular machine's rounding. Computations that are bit-identical (the same operations on the
same shapes in the same process) are compared exactly instead.

For next-token probabilities from a network this is applied as a first-order estimate: every
reduction on the path from the embeddings to a logit (:func:`path_length`) contributes its
``gamma`` at the scale of the logits (:func:`logit_scale`; the norms keep activations of order one),
and the softmax passes a logit error ``d`` on as at most ``2 p (1 - p) d <= d / 2``
(``dp_j/dz_i = p_j (delta_ij - p_i)``). Useful for the tiny test models (4 layers of width 32:
about 1e-3); for a 30-layer model such a worst-case bound is vacuous, and tests there compare
bit-identical computations or say what else justifies them.
"""
from __future__ import annotations

import math

from tracer.layers import get_module
from tracer.limits import ModelShape

U32 = 2.0 ** -24
U64 = 2.0 ** -53


def gamma(n: int, u: float = U32) -> float:
    """Higham's ``gamma_n``: relative worst-case error of an ``n``-term sum, any order."""
    assert n * u < 1
    return n * u / (1 - n * u)


def path_length(lm, n_positions: int) -> int:
    """Sum of the reduction lengths from the embeddings to one logit.

    Per layer: two norms, the Q/K/V and output projections and the MLP's input product (``hidden``
    terms each), the attention scores (head size), the weighted sum over ``n_positions`` and the
    MLP's output product (``intermediate``); then the final norm and the unembedding (``hidden``).
    """
    return blocks_length(lm, n_positions, ModelShape.of(lm).n_layers) + 2 * ModelShape.of(lm).hidden


def blocks_length(lm, n_positions: int, n_blocks: int) -> int:
    """The reductions of :func:`path_length` in the first ``n_blocks`` blocks only: the path from
    the embeddings to an activation inside or at the output of block ``n_blocks - 1``."""
    s = ModelShape.of(lm)
    per_layer = 5 * s.hidden + s.hidden // s.heads + n_positions + s.intermediate
    return n_blocks * per_layer


def activation_tol(lm, n_positions: int, n_blocks: int, scale):
    """``|da|`` between two float32 evaluations of an activation in block ``n_blocks - 1`` along
    different summation orders (other batch shapes, padding, a key/value cache): ``2 gamma(N) x
    scale``, ``N`` = :func:`blocks_length`. As for :func:`prob_tol` this is the first-order
    estimate: every reduction on the path contributes its ``gamma`` at ``scale``, the size of the
    sum that produces the activation (its sum of ``|terms|``, e.g. ``|W| |k| + |b|`` for an MLP
    output, measured in float64; a tensor gives one bound per element)."""
    return 2 * gamma(blocks_length(lm, n_positions, n_blocks)) * scale


def mean_nll_tol(lp_tol: float, n_terms: int, nll: float) -> float:
    """``|d nll|`` between two float32 means ``-(sum of n_terms log-probabilities) / n_terms`` whose
    terms differ by at most ``lp_tol`` each: ``lp_tol`` plus, per side, ``gamma(n_terms + 2)`` of
    ``sum |log p| / n_terms = nll`` for the float32 sum and the division(s)."""
    return lp_tol + 2 * gamma(n_terms + 2) * abs(nll)


def logit_scale(lm) -> float:
    """``Z >= sum_k |h_k W_ik| + |b_i|`` for every token ``i`` and every final-normed state ``h``.

    A normed state has ``||h||_2 <= max|norm weight| sqrt(hidden) + ||norm bias||_2``, so by
    Cauchy-Schwarz ``Z = that x max_i ||W_i||_2 + max|b|``, from the weights alone.
    """
    norm = get_module(lm.model, lm.layers.final_norm)
    unembed = get_module(lm.model, lm.layers.unembed)
    w = unembed.weight.double()
    h = float(norm.weight.double().abs().max()) * math.sqrt(w.shape[1])
    if getattr(norm, "bias", None) is not None:
        h += float(norm.bias.double().norm())
    bias = float(unembed.bias.double().abs().max()) if getattr(unembed, "bias", None) is not None else 0.0
    return h * float(w.norm(dim=1).max()) + bias


def logit_tol(lm, n_positions: int, length: int | None = None) -> float:
    """``|dz|`` between two float32 evaluations of a logit along different summation orders:
    ``2 gamma(N) Z`` with ``N`` = ``length`` or the whole :func:`path_length`."""
    n = path_length(lm, n_positions) if length is None else length
    return 2 * gamma(n) * logit_scale(lm)


def prob_tol(lm, n_positions: int, length: int | None = None) -> float:
    """``|dp|`` between two float32 evaluations of a next-token probability: the logits' share
    (``d / 2``, see the module docstring) plus each float32 softmax's own relative error
    ``gamma(vocab + 2)`` (its sum over the vocabulary, the exponential and the division)."""
    vocab = ModelShape.of(lm).vocab
    return logit_tol(lm, n_positions, length) / 2 + 2 * gamma(vocab + 2)


def logprob_tol(lm, n_positions: int, max_abs_logprob: float, length: int | None = None) -> float:
    """``|d log p|`` likewise: ``|dz_j| + |d logsumexp| <= 2 d`` (log-sum-exp is 1-Lipschitz), plus
    per float32 log-softmax ``gamma(vocab + 2)`` for its sum and ``u (|log p| + 1)`` for the
    subtraction and the logarithm."""
    vocab = ModelShape.of(lm).vocab
    return 2 * logit_tol(lm, n_positions, length) + 2 * (gamma(vocab + 2) + U32 * (max_abs_logprob + 1))


def softmax64_rtol(vocab: int, logit_range: float) -> float:
    """Relative difference of two float64 softmaxes (or exp of log-softmax) of the *same* logits:
    each within ``gamma(vocab + 2, u64)`` for the sum and ``u64 (|z_j - max z| + 2)`` for the
    subtraction and the exponential."""
    return 2 * (gamma(vocab + 2, U64) + U64 * (logit_range + 2))
