"""Sampled generations for the fluency and consistency metrics (ROME's ``generate_fast``).

    texts = generate(lm, ["Ferrari F40 is sold by"] * 3, max_length=100, top_k=5, seed=0)

Top-k sampling (k = 5) until each text is ``max_length`` tokens long, prompt included; the
returned strings include the prompt, as ROME's do. All prompts run as one left-padded batch with
the model's key/value cache. Randomness comes from a ``torch.Generator`` seeded with ``seed``;
the global RNG is not touched.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import HyperParameterError
from ..limits import Estimate, ModelShape, check_memory, check_seed, forward_bytes, prompt_ids
from ..models import LanguageModel


@torch.no_grad()
def generate(lm: LanguageModel, prompts: Sequence[str], *, max_length: int = 100, top_k: int = 5,
             seed: int = 0) -> list[str]:
    """One sampled continuation per prompt, decoded with the prompt; "batch" = len(prompts)."""
    if top_k < 1 or max_length < 2:
        raise HyperParameterError(f"top_k must be >= 1 and max_length >= 2, got top_k={top_k}, max_length={max_length}")
    seed = check_seed(seed)
    if max_length > lm.max_length:
        raise HyperParameterError(f"max_length={max_length} is more than the {lm.max_length} positions the model reads")
    tok = lm.tokenizer
    device = lm.device
    encoded = [prompt_ids(lm, p, f"generation prompt {i + 1}") for i, p in enumerate(prompts)]
    width = max(len(e) for e in encoded)
    shape = ModelShape.of(lm)
    if top_k > shape.vocab:
        raise HyperParameterError(f"top_k={top_k} is more than the model's {shape.vocab} tokens")
    length = max(width, max_length)
    need = forward_bytes(shape, len(encoded), width) + 2 * shape.n_layers * len(encoded) * length * shape.kv_dim * shape.itemsize
    check_memory(Estimate("this generation batch", need, (("forward pass and cache", need),)), device,
                 hint=f"generate fewer texts at once ({len(encoded)}) or shorter ones ({length} tokens)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, width - len(e):] = torch.tensor(e)
        mask[b, width - len(e):] = 1
    ids, mask = ids.to(device), mask.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    steps = max(0, max_length - width)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    step_ids, step_pos = ids, position
    out = [ids]
    for _ in range(steps):
        res = lm.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                       cache=past, use_cache=True)
        past = res.cache
        logits = res.logits[:, -1, :].float()
        top = logits.topk(top_k, dim=-1)
        probs = torch.softmax(top.values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=gen)
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
