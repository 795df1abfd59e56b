"""Shared fixtures: tiny random models of each supported family, and the embedded models.

Tiny models get real tokenizers trained here (in well under a second) on the shared Wikipedia
text: byte-level BPE with and without a leading-space prefix (GPT-2 style), a SentencePiece-style
Metaspace BPE (Llama style) and one that adds no space before the first word and starts every
text with ``<bos>`` (Gemma style). Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: the shared datasets: $FACTSCOPE_DATA when set (a worktree, another layout), else ../shared/data
SHARED_DATA = Path(os.environ.get("FACTSCOPE_DATA") or ROOT.parent / "shared" / "data")
FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "gemma3_text")

torch.set_num_threads(int(os.environ.get("FACTSCOPE_TEST_THREADS", min(2, os.cpu_count() or 1))))


@lru_cache(maxsize=None)
def _corpus() -> tuple[str, ...]:
    texts = []
    with gzip.open(SHARED_DATA / "wikipedia" / "enwiki_2015_3220_articles.jsonl.gz", "rt") as f:
        for i, line in enumerate(f):
            texts.append(json.loads(line)["text"][:3000])
            if i >= 200:
                break
    return tuple(texts)


@lru_cache(maxsize=None)
def tiny_tokenizer(style: str = "bytelevel"):
    """A trained tokenizer: ``bytelevel`` (GPT-2), ``bytelevel-prefix`` (leading space added),
    ``metaspace`` (SentencePiece-style, as Llama's fast tokenizer) or ``gemma`` (Metaspace without
    a space before the first word, ``<bos>`` first, as Gemma 3's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spm = style in ("metaspace", "gemma")
    tok = Tokenizer(models.BPE(unk_token="<unk>" if spm else None))
    if spm:
        prepend = "first" if style == "metaspace" else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend)
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend)
        alphabet = []
        specials = ["<unk>", "<s>", "</s>"] if style == "metaspace" else ["<pad>", "<eos>", "<bos>", "<unk>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=(style == "bytelevel-prefix"))
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        specials = ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet, special_tokens=specials)
    tok.train_from_iterator(_corpus(), trainer)
    if style == "gemma":
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                       unk_token="<unk>")
    eos = "</s>" if style == "metaspace" else "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos,
                                   unk_token="<unk>" if style == "metaspace" else None)
    return fast


def tiny_config(family: str, vocab_size: int, n_layers: int = 4):
    from transformers import Gemma3TextConfig, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=n_layers, n_head=4)
    if family == "gptj":
        return GPTJConfig(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=n_layers, n_head=4, rotary_dim=4)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=128, hidden_size=32,
                             num_hidden_layers=n_layers, num_attention_heads=4, intermediate_size=64)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=128, hidden_size=32,
                           num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, tie_word_embeddings=False)
    if family == "gemma3_text":
        # Gemma 3's layout: scaled, tied embeddings, norms before and after attention and MLP, and
        # sliding-window layers (window 4, shorter than the test prompts) between global ones
        return Gemma3TextConfig(vocab_size=vocab_size, max_position_embeddings=128, hidden_size=32,
                                num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                intermediate_size=64, query_pre_attn_scalar=8, sliding_window=4,
                                layer_types=[("sliding_attention", "full_attention")[i % 3 == 2] for i in range(n_layers)],
                                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    raise ValueError(family)


def make_tiny_model(family: str, seed: int = 0, n_layers: int = 4):
    """A :class:`tracer.LanguageModel` with random weights (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    from tracer.layers import layer_map_for
    from tracer.models import LanguageModel

    tokenizer = tiny_tokenizer({"llama": "metaspace", "gemma3_text": "gemma"}.get(family, "bytelevel"))
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer), n_layers)
    # the default init (0.02) gives near-uniform next-token distributions; 0.3 gives top-1
    # probabilities of 0.1-0.2, so traces and edits have something to move
    config.initializer_range = 0.3
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    return LanguageModel(model=model, tokenizer=tokenizer, layers=layer_map_for(model), name=f"tiny-{family}")


@pytest.fixture(params=FAMILIES)
def tiny_lm(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random GPT-2 saved as a local model directory, as a user's own model would be."""
    lm = make_tiny_model("gpt2")
    path = tmp_path_factory.mktemp("tiny-gpt2")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (loaded once per test session)."""
    from tracer.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma 3 270M (loaded once per test session)."""
    from tracer.models import load_model

    return load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA
