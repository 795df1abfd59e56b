"""MEMIT's targets in MLP-output space, for models that normalise the MLP output (Gemma 2/3).

MEMIT gives each edited layer a share ``r`` ("n hidden") of the change the residual stream needs
at the last edited block, and solves ΔW K = R for the MLP output projection. Where the block adds
the MLP output ``m`` itself, R = r. Where it adds ``norm(m)`` (an RMSNorm with gain g:
``norm(m) = g ⊙ m / rms(m)``), ``r`` must first be carried back through the norm: find ``m'`` whose
``norm(m')`` is nearest to ``t = norm(m) + r``, and solve for R = m' − m.

The norm is scale-free, so what it can output is ``g ⊙ x`` with ``rms(x) = 1``, and ``t`` may lie
off that set (the residual change asked for has a part no MLP output can give). The nearest
output solves min ‖g ⊙ x − t‖² subject to ‖x‖² = d, a trust-region subproblem:
``x_i = g_i t_i / (g_i² + μ)`` with the one μ > −min g_i² that gives ‖x‖² = d, found by bisection
in float64. Then ``m' = rms(m) · x``, the same scale as the output it replaces. When ``t`` is
reachable (``t / g`` has rms 1), ``x = t / g`` and ``norm(m') = t`` exactly (up to the norm's ε).
The part left out, ``‖norm(m') − t‖ / ‖r‖``, is returned so callers can report it; MEMIT recomputes
the residual after each layer, so later layers take up what an earlier one could not give.

The gain is read off the module itself (its output for an input of rms 1 is g ⊙ input), after
checking that it is an RMSNorm of that form, so any family whose map names its post-MLP norm works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HyperParameterError
from ..layers import get_module
from ..models import LanguageModel

_BISECTION_STEPS = 200


@dataclass(frozen=True)
class PostNorm:
    """The post-MLP RMSNorm of one layer: its gain ``g`` ("hidden", float64)."""

    layer: int
    gain: torch.Tensor

    @classmethod
    def of(cls, lm: LanguageModel, layer: int) -> "PostNorm":
        """The norm after ``layer``'s MLP, checked to be ``g ⊙ m / rms(m)`` (scale-free)."""
        name = lm.layers.mlp_post_norm_name(layer)
        if name is None:
            raise HyperParameterError(f"{lm.layers.family} adds the MLP output to the residual as it is; "
                                      "there is no post-MLP norm to invert")
        module = get_module(lm.model, name)
        p = next(module.parameters(), None)
        device, dtype = (p.device, p.dtype) if p is not None else (lm.device, torch.float32)
        probe = torch.randn(2, lm.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe = probe / probe.pow(2).mean(-1, keepdim=True).sqrt()  # rms 1
        with torch.no_grad():
            gain = module(torch.ones(1, lm.hidden_size, device=device, dtype=dtype)).double().cpu()[0]
            out = module(probe.to(device, dtype)).double().cpu()
            scaled = module((7.0 * probe).to(device, dtype)).double().cpu()
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        expected = gain * probe
        if not (torch.allclose(out, expected, rtol=tol, atol=tol * float(gain.abs().max()))
                and torch.allclose(scaled, out, rtol=tol, atol=tol * float(gain.abs().max()))):
            raise HyperParameterError(f"{name} is not a scale-free RMSNorm (g · m / rms(m)); MEMIT cannot carry "
                                      "its residual targets back through it: use ROME on this model")
        return cls(layer=layer, gain=gain)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        """``g ⊙ m / rms(m)`` in float64 ("n hidden"), the norm's ε left out."""
        m = m.double()
        return self.gain.to(m.device) * m / m.pow(2).mean(-1, keepdim=True).sqrt()

    def targets(self, m: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m' − m, shortfall)``: the change of the MLP output ("n hidden", float64) whose normalised
        output is nearest to ``norm(m) + resid``, and per row the part of ``resid`` it cannot give
        (‖norm(m') − t‖ / ‖resid‖, "n")."""
        m, resid = m.double(), resid.double()
        g = self.gain.to(m.device)
        t = self.forward(m) + resid
        d = m.shape[-1]
        gt = g * t
        g2 = g * g
        lo = (-g2.min()).expand(m.shape[0]).clone()
        hi = gt.norm(dim=-1) / d ** 0.5 - g2.min() + 1.0  # ‖x(hi)‖² <= d
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            too_long = ((gt / (g2 + mid[:, None])) ** 2).sum(-1) > d
            lo = torch.where(too_long, mid, lo)
            hi = torch.where(too_long, hi, mid)
        x = gt / (g2 + hi[:, None])
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # rms exactly 1 (also in the degenerate case)
        new = m.pow(2).mean(-1, keepdim=True).sqrt() * x
        shortfall = (self.forward(new) - t).norm(dim=-1) / resid.norm(dim=-1).clamp_min(1e-30)
        return new - m, shortfall
