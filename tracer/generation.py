"""Text the model writes: top-k samples (ROME's ``generate_fast``) and greedy continuations.

    texts = sample(lm, ["Ferrari F40 is sold by"] * 3, max_length=100, top_k=5, seed=0)
    [text] = greedy(lm, ["The Eiffel Tower is"], max_new_tokens=20)

:func:`sample`: top-k sampling until each text is ``max_length`` tokens long, prompt included; the
returned strings include the prompt, as ROME's do. All prompts run as one left-padded batch with
the model's key/value cache. Randomness comes from a ``torch.Generator`` (``seed``, or one passed
in to continue its stream); the global RNG is not touched. ROME's and MEMIT's context templates,
the fluency metrics and the panels all sample through it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import HyperParameterError
from .limits import Estimate, ModelShape, check_memory, check_seed, forward_bytes, prompt_ids
from .models import LanguageModel, as_model, cache_keyword


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
    tok = lm.tokenizer
    device = lm.device
    encoded = [list(p) if not isinstance(p, str) else prompt_ids(lm, p, f"generation prompt {i + 1}")
               for i, p in enumerate(prompts)]
    width = max(len(e) for e in encoded)
    shape = ModelShape.of(lm)
    if top_k > shape.vocab:
        raise HyperParameterError(f"top_k={top_k} is more than the model's {shape.vocab} tokens")
    length = max(width, max_length)
    need = forward_bytes(shape, len(encoded), width) + 2 * shape.n_layers * len(encoded) * length * shape.kv_dim * shape.itemsize
    check_memory(Estimate("this generation batch", need, (("forward pass and cache", need),)), device,
                 hint=f"generate fewer texts at once ({len(encoded)}) or shorter ones ({length} tokens)")
    ids = torch.full((len(encoded), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, width - len(e):] = torch.tensor(e)
        mask[b, width - len(e):] = 1
    ids, mask = ids.to(device), mask.to(device)
    steps = max(0, max_length - width)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    cache_kw = cache_keyword(lm.model)
    step_ids, step_pos = ids, position
    out = [ids]
    for _ in range(steps):
        res = lm.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                       **({cache_kw: past} if past is not None else {}))
        past = getattr(res, "cache", None) or res.past_key_values
        probs = torch.softmax(res.logits[:, -1, :].float(), dim=-1)
        top = probs.topk(top_k, dim=-1)
        choice = torch.multinomial(top.values / top.values.sum(-1, keepdim=True), 1, generator=generator)
        nxt = top.indices.gather(1, choice)  # "batch 1"
        out.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        step_pos = step_pos[:, -1:] + 1
        step_ids = nxt
    full = torch.cat(out, dim=1)
    texts = []
    for b in range(full.shape[0]):
        keep = full[b][mask[b].bool()] if steps == 0 else full[b][torch.cat([mask[b, :width].bool(), torch.ones(steps, dtype=torch.bool, device=device)])]
        texts.append(tok.decode(keep.tolist(), skip_special_tokens=True))
    return texts


@torch.no_grad()
def greedy(model: "LanguageModel | str", prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only), one prompt at a time."""
    lm = as_model(model)
    outs = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt_ids(lm, prompt, f"generation prompt {i + 1}", reserve=max_new_tokens,
                                       reserved_for="the generated tokens")], device=lm.device)
        gen = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=lm.pad_id)
        outs.append(lm.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs
