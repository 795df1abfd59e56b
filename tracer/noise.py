"""Noise for causal tracing: parsing the user's scale, estimating it, drawing it.

``"3s"`` means three standard deviations of subject-token embeddings (ROME's default), estimated
over the 1,209 subjects of ROME's known facts (shipped in ``tracer/data``). For the embedded model
the estimate is shipped too (``tracer/data/noise_std.json``, checked by a test).
"""
from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import torch

from .errors import HyperParameterError
from .layers import get_module
from .limits import check_seed
from .models import LanguageModel
from .trace_result import NoiseSpec

_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*s\s*$")


def _data(name: str) -> dict:
    return json.loads(resources.files("tracer").joinpath("data", name).read_text())


def known_subjects() -> list[str]:
    """The subjects of ROME's ``known_1000.json``."""
    return list(_data("known_subjects.json")["subjects"])


def subject_embedding_std(lm: LanguageModel, subjects: list[str] | None = None) -> float:
    """Standard deviation of all embedding entries of the subjects' tokens (ROME's estimate).

    Each subject is tokenised alone, as the original code does; ``subjects`` defaults to
    :func:`known_subjects`. Embedding look-ups only, well under a second.
    """
    subjects = subjects if subjects is not None else known_subjects()
    embed = get_module(lm.model, lm.layers.embed)
    ids = [torch.tensor(lm.encode(s), device=lm.device) for s in subjects if s.strip()]
    with torch.no_grad():
        values = torch.cat([embed(i).float().reshape(-1) for i in ids])
    return float(values.std())


def shipped_std(lm: LanguageModel) -> float | None:
    """The shipped estimate of :func:`subject_embedding_std` for the embedded model, else None."""
    entry = _data("noise_std.json").get(lm.name)
    return float(entry["std"]) if entry else None


def resolve_noise(lm: LanguageModel, noise: "float | str | NoiseSpec", mode: str = "rome",
                  distribution: str = "gaussian", replace: bool = False) -> NoiseSpec:
    """Turn ``0.1``, ``"0.1"``, ``"3s"`` or a :class:`NoiseSpec` into a :class:`NoiseSpec`."""
    if isinstance(noise, NoiseSpec):
        return noise
    multiple = None
    if isinstance(noise, str):
        m = _MULTIPLE.match(noise)
        if m:
            multiple = float(m.group(1))
            std = shipped_std(lm)
            scale = multiple * (std if std is not None else subject_embedding_std(lm))
        else:
            try:
                scale = float(noise)
            except ValueError:
                raise HyperParameterError(
                    f"noise {noise!r} is not understood; pass a number (absolute scale, e.g. 0.1) "
                    "or a multiple of the subject-embedding std such as '3s'") from None
    elif isinstance(noise, (int, float)) and not isinstance(noise, bool):
        scale = float(noise)
    else:
        raise HyperParameterError(f"noise must be a number, a string like '3s' or a NoiseSpec, got {type(noise).__name__}")
    return NoiseSpec(scale=scale, mode=mode, distribution=distribution, replace=replace, multiple=multiple)


def draw_noise(spec: NoiseSpec, samples: int, n_tokens: int, hidden: int, seed: int) -> torch.Tensor:
    """Noise of shape ``"sample subject_token hidden"`` in float64, on the CPU.

    ``mode="rome"`` reproduces the original code exactly: ``RandomState(seed).randn(...) * scale``
    (``uniform(-1, 1, ...)`` for uniform noise).
    """
    seed = check_seed(seed)
    shape = (samples, n_tokens, hidden)
    if spec.mode == "rome":
        rs = np.random.RandomState(seed)
        raw = rs.randn(*shape) if spec.distribution == "gaussian" else rs.uniform(-1, 1, shape)
        return torch.from_numpy(raw) * spec.scale
    gen = torch.Generator().manual_seed(seed)
    if spec.distribution == "gaussian":
        raw = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        raw = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    return raw * spec.scale


def corrupting(lo: int, hi: int, noise: torch.Tensor, replace: bool, first_row: int = 0):
    """An embedding-output hook (for :func:`tracer.hooks.hooked`): ``h`` with columns ``lo:hi`` of
    rows ``first_row:`` corrupted by ``noise`` ("rows (hi - lo) hidden", or broadcastable to it), see
    :func:`corrupt`. The one noise hook of the causal traces (batched and naive) and of the lens
    that replays them."""

    def add(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[first_row:, lo:hi] = corrupt(h[first_row:, lo:hi], noise, replace)
        return h

    return add


def corrupt(embeddings: torch.Tensor, noise: torch.Tensor, replace: bool) -> torch.Tensor:
    """Add (or substitute) float64 ``noise`` to ``embeddings`` of the same shape, keeping dtype.

    The sum is taken in float64 and rounded once, as the original code's in-place add does.
    """
    noise = noise.to(embeddings.device)
    out = noise if replace else embeddings.double() + noise
    return out.to(embeddings.dtype)
