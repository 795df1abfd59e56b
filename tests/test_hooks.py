"""tracer/hooks.py: the one hook primitive edits outputs and inputs and never outlives its block."""
from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module

from conftest import make_tiny_model
from tracer.errors import UnknownLayerError
from tracer.hooks import active_hook_count, hooked, record_outputs


def test_output_input_and_replace_hooks():
    lm = make_tiny_model("llama")
    ids = torch.tensor([lm.encode("The Eiffel Tower is")])
    clean = lm.model(ids).logits
    block = lm.layers.block_name(1)
    fns, store = record_outputs([block, lm.layers.name("mlp", 0)])
    with hooked(lm.model, outputs=fns):
        lm.model(ids)
    assert store[block].shape == (1, ids.shape[1], lm.hidden_size)
    keys = {}
    with hooked(lm.model, inputs={lm.layers.mlp_out_name(0): lambda k: keys.setdefault("k", k)}):
        lm.model(ids)
    assert keys["k"].shape[-1] == lm.model.config.intermediate_size
    with hooked(lm.model, outputs={block: lambda h: torch.zeros_like(h)}):
        zeroed = lm.model(ids).logits
    assert not torch.allclose(zeroed, clean)
    # replacing block 1 by its recorded output gives the same logits without running it, bit for
    # bit: the recorded output came from the same float32 operations on the same shapes, and every
    # later operation is the same as in the clean pass (tests/float32.py)
    with hooked(lm.model, replace={block: lambda *a, **k: store[block]}):
        assert torch.equal(lm.model(ids).logits, clean)
    assert active_hook_count(lm.model) == 0
    assert torch.equal(lm.model(ids).logits, clean)


def test_names_checked_before_anything_is_installed():
    lm = make_tiny_model("gpt2")
    with pytest.raises(UnknownLayerError):
        with hooked(lm.model, outputs={lm.layers.block_name(0): lambda h: None, "transformer.h.99": lambda h: None}):
            pass
    assert active_hook_count(lm.model) == 0


def test_replace_keeps_a_forward_it_did_not_install():
    """accelerate wraps the forward of every dispatched module in an instance attribute; a
    replacement shadows it for the block and puts the same wrapper back."""
    lm = make_tiny_model("gpt2")
    ids = torch.tensor([lm.encode("The Eiffel Tower is")])
    block = lm.model.get_submodule(lm.layers.block_name(1))
    add_hook_to_module(block, ModelHook())
    wrapper = block.__dict__["forward"]
    clean = lm.model(ids).logits
    fns, store = record_outputs([lm.layers.block_name(1)])
    with hooked(lm.model, outputs=fns):
        lm.model(ids)
    with hooked(lm.model, replace={lm.layers.block_name(1): lambda *a, **k: store[lm.layers.block_name(1)]}):
        assert active_hook_count(lm.model) == 1
        assert torch.equal(lm.model(ids).logits, clean)
    assert block.__dict__["forward"] is wrapper and active_hook_count(lm.model) == 0
    assert torch.equal(lm.model(ids).logits, clean)
