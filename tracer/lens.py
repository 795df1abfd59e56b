"""Layer-by-layer view (a norm-aware logit lens): what each layer would predict if it were the last.

Each block's output (the residual stream after that layer) is decoded through the model's own
final norm and unembedding, at every position::

    lens = logit_lens(lm, "The Eiffel Tower is located in the city of", targets=[" Paris", " Rome"])
    lens.top_tokens[-1][-1]     # top token at the last position after the last layer
    lens.probs[0, -1, :]        # P(" Paris") at the last position, layer by layer
    lens.ranks[0, -1, :]        # its rank (0 = top-1) layer by layer

Using the model's own norm module (LayerNorm or RMSNorm, with its gain and bias) and its own
unembedding (tied to the input embedding or not, with a bias where the family has one) makes the
last layer's lens equal to the model's logits. ``extra_outputs`` lets a caller run the lens on an
intervened forward pass (see :func:`restored_lens` for the run of one causal-trace restoration).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import HyperParameterError, PromptError
from .files import write_json_atomic
from .hooks import TensorFn, hooked, record_outputs
from .layers import get_module
from .limits import Estimate, ModelShape, check_count, check_memory, forward_bytes, prompt_ids
from .models import LanguageModel, as_model
from .noise import corrupting, draw_noise
from .trace_result import TraceResult, restored_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LensResult:
    """Logit lens of one prompt.

    Arrays are indexed ``[pos, layer]`` (like :attr:`TraceResult.scores`, tokens as rows) and
    ``[target, pos, layer]`` for the chosen tokens. ``ranks`` count how many vocabulary entries
    have a strictly larger probability (0 = top-1). When the lens averages several runs
    (``samples > 1``, e.g. noise samples of a restored trace), probabilities are averaged over
    runs and the top token and ranks are taken from the averaged distribution.
    """

    prompt: str
    tokens: list[str]
    model: str
    top_ids: np.ndarray  # "pos layer" int
    top_tokens: list[list[str]]  # [pos][layer]
    top_probs: np.ndarray  # "pos layer"
    target_ids: list[int]
    targets: list[str]
    probs: np.ndarray  # "target pos layer"
    ranks: np.ndarray  # "target pos layer" int
    label: str = "clean"
    samples: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.top_probs.shape[1])

    def target_index(self, target: str | int) -> int:
        """Row of ``target`` (decoded text or token id) in :attr:`probs` / :attr:`ranks`."""
        if isinstance(target, (int, np.integer)) and int(target) in self.target_ids:
            return self.target_ids.index(int(target))
        if target in self.targets:
            return self.targets.index(target)
        raise HyperParameterError(f"target {target!r} is not in this lens result; it has {self.targets}")

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt, "tokens": list(self.tokens), "model": self.model,
            "top_ids": self.top_ids.tolist(), "top_tokens": [list(r) for r in self.top_tokens],
            "top_probs": self.top_probs.tolist(), "target_ids": list(self.target_ids),
            "targets": list(self.targets), "probs": self.probs.tolist(), "ranks": self.ranks.tolist(),
            "label": self.label, "samples": self.samples, "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LensResult":
        d = dict(d)
        n_pos = len(d["tokens"])
        d["top_ids"] = np.asarray(d["top_ids"], dtype=np.int64)
        d["top_probs"] = np.asarray(d["top_probs"], dtype=np.float64)
        shape = (len(d["targets"]), n_pos, d["top_probs"].shape[1])
        d["probs"] = np.asarray(d["probs"], dtype=np.float64).reshape(shape)
        d["ranks"] = np.asarray(d["ranks"], dtype=np.int64).reshape(shape)
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LensResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _target_ids(lm: LanguageModel, targets: Sequence[str | int]) -> list[int]:
    """First token id of each target (a string is tokenised without special tokens)."""
    ids = []
    for t in targets:
        if isinstance(t, (int, np.integer)):
            ids.append(int(t))
            continue
        if not isinstance(t, str) or not t:
            raise HyperParameterError(f"a lens target must be a non-empty string or a token id, got {t!r}")
        tok = lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        if not tok:
            raise HyperParameterError(f"target {t!r} tokenises to nothing")
        ids.append(int(tok[0]))
    return ids


def decode_layers(lm: LanguageModel, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of residual-stream states through the final norm and unembedding.

    ``hidden``: "... hidden" -> "... vocab". The log-softmax runs in float64: in float32 its sum
    over the vocabulary has a worst-case relative error of ``vocab x 2**-24`` (3e-3 for 49,152
    tokens) that depends on the machine's summation order; in float64 the probabilities are those
    of the float32 logits to ~1e-11, on any machine.
    """
    norm = get_module(lm.model, lm.layers.final_norm)
    unembed = get_module(lm.model, lm.layers.unembed)
    logits = unembed(norm(hidden))
    return torch.log_softmax(logits.double(), dim=-1)


@torch.no_grad()
def logit_lens(
    model: LanguageModel | str,
    prompt: str,
    *,
    targets: Sequence[str | int] = (),
    answer: bool = True,
    extra_outputs: dict[str, TensorFn] | None = None,
    runs: int = 1,
    label: str = "clean",
) -> LensResult:
    """Decode every layer's output at every position of ``prompt``.

    ``targets``: tokens whose probability and rank to follow across layers (text: its first
    token). With ``answer=True`` the model's own top-1 next token is put first.
    ``extra_outputs``: output hooks (as for :func:`tracer.hooks.hooked`) active during the pass.
    ``runs``: copies of the prompt in the batch (for hooks that treat each copy differently, e.g.
    noise samples); probabilities are averaged over the copies.
    """
    lm = as_model(model)
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("the prompt is empty; pass the text whose next token the model predicts")
    ids = prompt_ids(lm, prompt)
    runs = check_count("runs", runs)
    shape = ModelShape.of(lm)
    # the recorded block outputs, one forward pass with full logits, one layer's decoded probabilities
    parts = (("block outputs", runs * len(ids) * shape.hidden * shape.n_layers * shape.itemsize),
             ("forward pass", forward_bytes(shape, runs, len(ids), logit_positions=len(ids))),
             ("decoded layer", 3 * runs * len(ids) * shape.vocab * 8))
    check_memory(Estimate("this logit lens", sum(p for _, p in parts), parts), lm.device,
                 hint=f"lower runs ({runs}) or shorten the prompt ({len(ids)} tokens)")
    n_layers = lm.n_layers
    names = [lm.layers.block_name(i) for i in range(n_layers)]
    recorders, store = record_outputs(names)
    hooks = dict(extra_outputs or {})
    for name, rec in recorders.items():  # record after any intervention at the same block
        if name in hooks:
            hooks[name] = _then_record(hooks[name], rec)
        else:
            hooks[name] = rec
    device = lm.device
    input_ids = torch.tensor([ids], device=device).expand(runs, -1)
    with hooked(lm.model, outputs=hooks):
        out = lm.model(input_ids=input_ids)
    final_logp = torch.log_softmax(out.logits.double(), dim=-1).exp().mean(0)  # "pos vocab"
    target_ids = ([int(final_logp[-1].argmax())] if answer else []) + _target_ids(lm, targets)
    seen: list[int] = []
    for t in target_ids:  # keep order, drop repeats
        if t not in seen:
            seen.append(t)
    target_ids = seen
    n_pos = len(ids)
    top_ids = np.zeros((n_pos, n_layers), dtype=np.int64)
    top_probs = np.zeros((n_pos, n_layers))
    probs = np.zeros((len(target_ids), n_pos, n_layers))
    ranks = np.zeros((len(target_ids), n_pos, n_layers), dtype=np.int64)
    tid = torch.tensor(target_ids, dtype=torch.long)
    for layer, name in enumerate(names):
        p = decode_layers(lm, store[name]).exp().mean(0)  # "pos vocab", mean over runs, on the unembedding's device
        top_p, top_i = p.max(dim=-1)
        top_ids[:, layer] = top_i.cpu().numpy()
        top_probs[:, layer] = top_p.cpu().numpy()
        if len(target_ids):
            pt = p[:, tid.to(p.device)]  # "pos target"
            probs[:, :, layer] = pt.T.cpu().numpy()
            ranks[:, :, layer] = (p.unsqueeze(1) > pt.unsqueeze(-1)).sum(-1).T.cpu().numpy()
    top_tokens = [[lm.decode(int(i)) for i in row] for row in top_ids]
    tokens = [lm.decode(i) for i in ids]
    return LensResult(
        prompt=prompt, tokens=tokens, model=lm.name, top_ids=top_ids, top_tokens=top_tokens,
        top_probs=top_probs, target_ids=target_ids, targets=[lm.decode(t) for t in target_ids],
        probs=probs, ranks=ranks, label=label, samples=runs,
    )


def _then_record(first: TensorFn, record: TensorFn) -> TensorFn:
    def fn(h: torch.Tensor):
        new = first(h)
        record(h if new is None else new)
        return new

    return fn


def restored_lens(model: LanguageModel | str, result, token: int, layer: int, *, targets: Sequence[str | int] = ()) -> LensResult:
    """Lens of the restored run behind one cell of a causal trace (``result``: a ``TraceResult``).

    The subject's embeddings get the trace's noise (same ``NoiseSpec``, samples and seed, so the
    same draw) and the cell's site is restored to its clean value at position ``token``: block
    ``layer``'s output for ``kind="hidden"``, the window of MLP / attention outputs centred on
    ``layer`` (as in ROME) for ``"mlp"`` / ``"attn"``. Probabilities are averaged over the noise
    samples, so the answer's probability at the last position after the last layer equals the
    trace's score at ``(token, layer)`` (checked by a test). Severed traces are not supported.
    """

    lm = as_model(model)
    if not isinstance(result, TraceResult):
        raise HyperParameterError(f"restored_lens needs a TraceResult, got {type(result).__name__}")
    if result.severed:
        raise HyperParameterError("restored_lens does not replay severed traces; use a trace with severed=None")
    n_tok, n_layers = result.scores.shape
    if not (0 <= token < n_tok and 0 <= layer < n_layers):
        raise HyperParameterError(f"cell ({token}, {layer}) is outside the trace's {n_tok} tokens x {n_layers} layers")
    restored = restored_layers(result.kind, layer, result.window, n_layers)
    sites = [lm.layers.name(result.kind, i) for i in restored]
    recorders, clean = record_outputs(sites)
    with torch.no_grad(), hooked(lm.model, outputs=recorders):
        lm.model(input_ids=torch.tensor([prompt_ids(lm, result.prompt)], device=lm.device))

    def restorer(site: str) -> TensorFn:
        value = clean[site][0, token]

        def restore(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            h[:, token] = value.to(h.device, h.dtype)
            return h

        return restore

    hooks = {lm.layers.embed: _noise_hook(result, lm.hidden_size), **{site: restorer(site) for site in sites}}
    what = f"layer {layer}" if result.kind == "hidden" else f"{result.kind} layers {restored[0]}-{restored[-1]}"
    return logit_lens(lm, result.prompt, targets=[result.answer_id, *targets], answer=False,
                      extra_outputs=hooks, runs=result.samples,
                      label=f"restored {result.tokens[token]!r}, {what}")


def _noise_hook(result, hidden_size: int):
    """Embedding-output hook adding the trace's noise (same draw) to the subject's tokens."""

    start, end = result.subject_span
    noise = draw_noise(result.noise, result.samples, end - start, hidden_size, result.seed)
    return corrupting(start, end, noise, result.noise.replace)
