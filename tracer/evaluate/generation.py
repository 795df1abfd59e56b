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
from ..models import LanguageModel


@torch.no_grad()
def generate(lm: LanguageModel, prompts: Sequence[str], *, max_length: int = 100, top_k: int = 5,
             seed: int = 0) -> list[str]:
    """One sampled continuation per prompt, decoded with the prompt; "batch" = len(prompts)."""
    if top_k < 1 or max_length < 2:
        raise HyperParameterError(f"top_k must be >= 1 and max_length >= 2, got top_k={top_k}, max_length={max_length}")
    tok = lm.tokenizer
    device = lm.device
    encoded = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
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
