"""Context templates: ``"{}"`` plus short texts the model writes itself, each followed by ``". {}"``.

ROME averages its key k* over them and asks v* to work after each; MEMIT does the same for its z
and keys. Both sample with :func:`tracer.generation.sample` (top-5, ROME's ``generate_fast``):

- ROME (:func:`generate_context_templates`): ``count`` texts of each ``tokens`` length (the start
  counted, as ROME counts), one random stream for all, from a document-start token (ROME's
  choice, ``starts="document"``) or from the start words :data:`TEMPLATE_STARTS` in turn
  (``starts="words"``: sentences rather than document fragments, for models such as instruct
  models that never begin a text with that token);
- MEMIT (:func:`context_templates`): from the start words :data:`TEMPLATE_STARTS`.

Blank lines become spaces and braces are removed, so a template holds ``{}`` exactly once.
"""
from __future__ import annotations

import unicodedata
from typing import Literal, Sequence

import torch

from ..errors import EditError
from ..generation import sample
from ..limits import check_seed
from ..models import LanguageModel, as_model
from .hparams import MemitHyperParams, ROMEHyperParams

#: start words of MEMIT's generated context templates
TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You")
#: where ROME's templates start: a document-start token, or :data:`TEMPLATE_STARTS`
TemplateStarts = Literal["document", "words"]


def generate_context_templates(model: "LanguageModel | str", lengths: Sequence[tuple[int, int]] = ((5, 10), (10, 10)),
                               seed: int = 0, starts: TemplateStarts = "document") -> tuple[str, ...]:
    """ROME's templates: ``"{}"`` plus, for each ``(tokens, count)``, ``count`` sampled texts of
    ``tokens`` tokens started from a document-start token (``starts="document"``) or from the
    words :data:`TEMPLATE_STARTS` in turn (``"words"``). Deterministic for a given ``seed``."""
    lm = as_model(model)
    if starts not in ("document", "words"):
        raise EditError(f"template starts must be 'document' or 'words', got {starts!r}")
    start = document_start_id(lm.tokenizer) if starts == "document" else None
    generator = torch.Generator(device=lm.device).manual_seed(check_seed(seed))
    templates = ["{}"]
    for length, count in lengths:
        if count == 0:
            continue
        prompts = ([[start]] * count if start is not None
                   else [TEMPLATE_STARTS[i % len(TEMPLATE_STARTS)] for i in range(count)])
        texts = sample(lm, prompts, max_length=length, top_k=5, generator=generator)
        templates += [_template(unicodedata.normalize("NFKD", t).replace("\n\n", " ")) for t in texts]
    return tuple(templates)


def rome_templates(model: "LanguageModel | str", hp: ROMEHyperParams) -> tuple[str, ...]:
    """The templates ROME's settings ``hp`` ask for (lengths, seed and starts)."""
    return generate_context_templates(model, hp.context_template_lengths, hp.template_seed, hp.template_starts)


def context_templates(model: "LanguageModel | str", hp: MemitHyperParams | None = None) -> tuple[str, ...]:
    """MEMIT's templates: ``"{}"`` plus ``hp.context_templates_per_start`` texts of
    ``hp.context_template_length`` tokens from each of :data:`TEMPLATE_STARTS` (seed ``hp.seed``);
    ``"{}"`` alone when that count is 0 (the bare prompts: fewer rows per request, a faster z)."""
    lm = as_model(model)
    length = hp.context_template_length if hp else 10
    per = hp.context_templates_per_start if hp else 1
    seed = hp.seed if hp else 0
    starts = [s for s in TEMPLATE_STARTS for _ in range(per)]
    if not starts:
        return ("{}",)
    return ("{}",) + tuple(_template(t) for t in sample(lm, starts, max_length=length, top_k=5, seed=seed))


def document_start_id(tokenizer) -> int:
    """GPT-2's ``<|endoftext|>`` where the vocabulary has it (ROME's choice), else BOS, else EOS."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise EditError("the tokenizer has no <|endoftext|>, BOS or EOS token to start context templates from; "
                    "pass context_templates= explicitly")


def _template(text: str) -> str:
    return text.replace("{", " ").replace("}", " ") + ". {}"


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """``templates`` as a tuple, if the first is ``"{}"`` and each holds ``{}`` exactly once."""
    templates = tuple(templates)
    if not templates or templates[0] != "{}" or any(not isinstance(t, str) or t.count("{}") != 1 for t in templates):
        raise EditError("context_templates must start with '{}' and each contain '{}' exactly once")
    return templates
