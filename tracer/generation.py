"""Text the model writes: top-k samples (ROME's ``generate_fast``) and greedy continuations.

    texts = sample(lm, ["Ferrari F40 is sold by"] * 3, max_length=100, top_k=5, seed=0)
    [text] = greedy(lm, ["The Eiffel Tower is"], max_new_tokens=20)

Both run one decoding loop (:func:`_decode`): all prompts as one left-padded batch with the
model's key/value cache, position ids counted from each row's first real token.

:func:`sample`: top-k sampling until each text is ``max_length`` tokens long, prompt included; the
returned strings include the prompt, as ROME's do. Randomness comes from a ``torch.Generator``
(``seed``, or one passed in to continue its stream); the global RNG is not touched. ROME's and
MEMIT's context templates, the fluency metrics and the panels all sample through it.

:func:`greedy`: the arg-max token at each step, at most ``max_new_tokens`` of them, a row ending at
its first end-of-sequence token (as ``transformers``' ``generate(do_sample=False)``); returns the
new text only. ``check_edit``'s generations and the generation-based efficacy of ``factscope
evaluate`` use it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import HyperParameterError
from .limits import Estimate, ModelShape, check_memory, check_seed, forward_bytes, prompt_ids
from .models import LanguageModel, as_model, cache_keyword

#: picks the next token of every row from the last position's logits, ``"batch vocab" -> "batch 1"``
Chooser = Callable[[torch.Tensor], torch.Tensor]


def _decode(lm: LanguageModel, encoded: Sequence[Sequence[int]], steps: int, choose: Chooser,
            stop: frozenset[int] = frozenset()) -> list[list[int]]:
    """The new token ids of each row after ``steps`` decoding steps (fewer once every row has
    produced a token in ``stop``; a row's ids end at its first such token, which is kept)."""
    device = lm.device
    width = max(len(e) for e in encoded)
    shape = ModelShape.of(lm)
    length = width + steps
    need = forward_bytes(shape, len(encoded), width) + 2 * shape.n_layers * len(encoded) * length * shape.kv_dim * shape.itemsize
    check_memory(Estimate("this generation batch", need, (("forward pass and cache", need),)), device,
                 hint=f"generate fewer texts at once ({len(encoded)}) or shorter ones ({length} tokens)")
    ids = torch.full((len(encoded), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, width - len(e):] = torch.tensor(list(e), dtype=torch.long)
        mask[b, width - len(e):] = 1
    ids, mask = ids.to(device), mask.to(device)
    step_pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    cache_kw = cache_keyword(lm.model)
    step_ids = ids
    new: list[list[int]] = [[] for _ in encoded]
    done = [False] * len(encoded)
    for _ in range(steps):
        res = lm.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                       **({cache_kw: past} if past is not None else {}))
        past = getattr(res, "cache", None) or res.past_key_values
        nxt = choose(res.logits[:, -1, :].float())  # "batch 1"
        for b, t in enumerate(nxt[:, 0].tolist()):
            if not done[b]:
                new[b].append(t)
                done[b] = t in stop
        if stop and all(done):
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = nxt
    return new


def _encode_all(lm: LanguageModel, prompts: Sequence["str | list[int]"], reserve: int = 0) -> list[list[int]]:
    return [list(p) if not isinstance(p, str) else
            prompt_ids(lm, p, f"generation prompt {i + 1}", reserve=reserve, reserved_for="the generated tokens")
            for i, p in enumerate(prompts)]


@torch.no_grad()
def sample(model: "LanguageModel | str", prompts: Sequence["str | list[int]"], *, max_length: int = 100, top_k: int = 5,
           seed: int = 0, generator: torch.Generator | None = None) -> list[str]:
    """One sampled continuation per prompt (text, or token ids used as they are), decoded with the
    prompt (special tokens dropped); "batch" = len(prompts). At each step the next token is drawn
    from the ``top_k`` most likely, with their probabilities renormalised (ROME's rule)."""
    lm = as_model(model)
    if top_k < 1 or max_length < 2:
        raise HyperParameterError(f"top_k must be >= 1 and max_length >= 2, got top_k={top_k}, max_length={max_length}")
    if generator is None:
        generator = torch.Generator(device=lm.device).manual_seed(check_seed(seed))
    if max_length > lm.max_length:
        raise HyperParameterError(f"max_length={max_length} is more than the {lm.max_length} positions the model reads")
    encoded = _encode_all(lm, prompts)
    if top_k > ModelShape.of(lm).vocab:
        raise HyperParameterError(f"top_k={top_k} is more than the model's {ModelShape.of(lm).vocab} tokens")

    def choose(logits: torch.Tensor) -> torch.Tensor:
        top = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        choice = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1, generator=generator)
        return top.indices.gather(1, choice)

    width = max(len(e) for e in encoded)
    new = _decode(lm, encoded, max(0, max_length - width), choose)
    return [lm.tokenizer.decode(e + n, skip_special_tokens=True) for e, n in zip(encoded, new)]


def stop_ids(lm: LanguageModel) -> frozenset[int]:
    """The end-of-sequence ids a greedy continuation stops at: the generation config's, else the tokenizer's."""
    ids = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = lm.tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or ())
    return frozenset(int(i) for i in ids)


@torch.no_grad()
def greedy(model: "LanguageModel | str", prompts: Sequence[str], max_new_tokens: int = 20, *,
           batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only, special tokens dropped), ``batch_size``
    prompts per left-padded batch."""
    lm = as_model(model)
    if max_new_tokens < 1 or batch_size < 1:
        raise HyperParameterError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    encoded = _encode_all(lm, prompts, reserve=max_new_tokens)
    stop = stop_ids(lm)
    out: list[str] = []
    for start in range(0, len(encoded), batch_size):
        new = _decode(lm, encoded[start:start + batch_size], max_new_tokens, lambda logits: logits.argmax(-1, keepdim=True),
                      stop)
        out += [lm.tokenizer.decode(n, skip_special_tokens=True) for n in new]
    return out
