"""Teacher-forced probabilities of whole targets after prompts, many pairs per forward pass.

    scores = score_targets(lm, [("The Eiffel Tower is in", "Paris"), ("The Eiffel Tower is in", "Rome")])
    scores[0].nll          # mean negative log-probability per target token (ROME's ``test_batch_prediction``)
    scores[0].prob         # exp(-nll): the per-token geometric mean probability of the whole target
    scores[0].accuracy     # fraction of target tokens that are the arg-max (MEMIT's zsRE metric)
    logp = next_token_logprobs(lm, ["The Eiffel Tower is in"])   # "prompt vocab": the whole next-token distribution

The target is tokenised *in context*: the text ``prompt + " " + target`` is tokenised once, the
tokens that end inside the prompt form the prefix, the rest is the target. Only the positions
that predict a target token go through the unembedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import PromptError
from .layers import get_module
from .limits import Estimate, ModelShape, check_memory, check_prompt_length, forward_bytes, prompt_ids
from .models import LanguageModel, right_pad
from .targets import spaced


@dataclass(frozen=True)
class TargetScore:
    """Log-probabilities of one target's tokens after one prompt (teacher forced)."""

    logprobs: tuple[float, ...]
    correct: tuple[bool, ...]  # token is the arg-max at its position
    #: with ``score_targets(top_k=k)``: the k most likely (token id, probability) after the prompt
    top: tuple[tuple[int, float], ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.logprobs)

    @property
    def nll(self) -> float:
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        return math.exp(-self.nll)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def first_prob(self) -> float:
        """Probability of the target's first token right after the prompt."""
        return math.exp(self.logprobs[0])

    def to_dict(self) -> dict:
        d = {"logprobs": list(self.logprobs), "correct": list(self.correct)}
        if self.top:
            d["top"] = [list(t) for t in self.top]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TargetScore":
        return cls(tuple(d["logprobs"]), tuple(bool(c) for c in d["correct"]),
                   tuple((int(t), float(p)) for t, p in d.get("top", ())))


def split_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + " " + target`` and the number of prefix tokens.

    A target without a leading space gets one (CounterFact and zsRE store bare strings).
    """
    if not target.strip():
        raise PromptError(f"empty target after prompt {prompt!r}")
    text_target = spaced(target)
    text = prompt + text_target
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    cut = len(prompt)
    n_prefix = 0
    for i, (a, b) in enumerate(offsets):
        if b > a and b > cut:
            break
        n_prefix = i + 1
    if n_prefix == 0 or n_prefix >= len(ids):
        raise PromptError(f"cannot separate prompt {prompt!r} from target {target!r} after tokenisation")
    return ids, n_prefix


@torch.no_grad()
def score_targets(lm: LanguageModel, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64,
                  top_k: int = 0) -> list[TargetScore]:
    """Teacher-forced scores of ``(prompt, target)`` pairs; one forward per ``batch_size`` pairs.
    ``top_k`` > 0 also gives each pair the ``top_k`` most likely next tokens after its prompt.

    Right padding with an attention mask; the backbone runs on "batch pos", the unembedding only on
    the rows that predict a target token.
    """
    encoded = [split_prompt_target(lm.tokenizer, p, t) for p, t in pairs]
    for (prompt, target), (seq, _) in zip(pairs, encoded):  # every pair, before any forward pass
        check_prompt_length(len(seq), lm.max_length, f"prompt {prompt[:40]!r} with target {target[:40]!r}")
    if encoded:
        width = max(len(seq) for seq, _ in encoded)
        n_target = max(len(seq) - n for seq, n in encoded)
        need = forward_bytes(ModelShape.of(lm), min(batch_size, len(encoded)), width, logit_positions=n_target)
        check_memory(Estimate("scoring one batch", need, (("forward pass", need),)), lm.device,
                     hint=f"lower batch_size ({batch_size}) or shorten the prompts (up to {width} tokens)")
    backbone = get_module(lm.model, lm.layers.backbone)
    unembed = get_module(lm.model, lm.layers.unembed)
    out: list[TargetScore] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = right_pad([seq for seq, _ in chunk], lm.pad_id, "cpu")
        rows, cols, gold = [], [], []
        for b, (seq, n_prefix) in enumerate(chunk):
            for pos in range(n_prefix, len(seq)):
                rows.append(b)
                cols.append(pos - 1)
                gold.append(seq[pos])
        device = lm.device
        hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # "batch pos hidden"
        logits = unembed(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]).float()
        logp = torch.log_softmax(logits, dim=-1)
        gold_t = torch.tensor(gold, device=device)
        lp = logp.gather(1, gold_t[:, None])[:, 0].cpu().tolist()
        hit = (logits.argmax(-1) == gold_t).cpu().tolist()
        k = 0
        for seq, n_prefix in chunk:
            n = len(seq) - n_prefix
            top = ()
            if top_k:  # the row predicting the first target token holds the distribution after the prompt
                best = torch.topk(logp[k].exp(), top_k)
                top = tuple(zip(best.indices.tolist(), best.values.tolist()))
            out.append(TargetScore(tuple(lp[k:k + n]), tuple(bool(h) for h in hit[k:k + n]), top))
            k += n
    return out


@torch.no_grad()
def next_token_logprobs(lm: LanguageModel, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities of every next token after each prompt, float32 on the CPU, ``"prompt vocab"``.

    Prompts are right-padded in batches; the unembedding runs only at each prompt's own last
    token, so padding never reaches a real position (causal attention). Every prompt is checked
    before the first forward pass.
    """
    encoded = [prompt_ids(lm, p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    shape = ModelShape.of(lm)
    if encoded:
        need = forward_bytes(shape, min(batch_size, len(encoded)), max(map(len, encoded))) + len(encoded) * shape.vocab * 4
        check_memory(Estimate("next-token distributions", need, (("forward pass and distributions", need),)), lm.device,
                     hint=f"pass fewer prompts ({len(encoded)}) or a smaller batch_size ({batch_size})")
    backbone = get_module(lm.model, lm.layers.backbone)  # ends with the final norm
    unembed = get_module(lm.model, lm.layers.unembed)
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = right_pad(chunk, lm.pad_id, lm.device)
        hidden = backbone(input_ids=ids, attention_mask=mask)[0]  # "batch pos hidden"
        last = torch.tensor([len(e) - 1 for e in chunk], device=hidden.device)
        logits = unembed(hidden[torch.arange(len(chunk), device=hidden.device), last]).float()  # "batch vocab"
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros((0, shape.vocab))
