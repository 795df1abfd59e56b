"""tracer/layers.py: per-family layer maps, checked against real modules."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_tiny_model
from tracer.errors import UnknownLayerError, UnsupportedArchitectureError
from tracer.hooks import hooked
from tracer.layers import LAYER_MAPS, LayerMap, get_module, layer_map_for


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_resolve_every_layer(family):
    lm = make_tiny_model(family)
    for layer in range(lm.n_layers):
        for kind in ("hidden", "mlp", "attn"):
            assert isinstance(get_module(lm.model, lm.layers.name(kind, layer)), torch.nn.Module)
        w = get_module(lm.model, lm.layers.mlp_out_name(layer)).weight
        d_out = w.shape[1] if lm.layers.mlp_out_transposed else w.shape[0]
        assert d_out == lm.hidden_size
    assert LayerMap.from_dict(lm.layers.to_dict()) == lm.layers


def test_unknown_architecture_lists_supported_and_custom_map():
    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "oddformer", "num_hidden_layers": 1})()

        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(UnsupportedArchitectureError) as e:
        layer_map_for(Odd())
    assert "oddformer" in str(e.value) and "gpt2" in str(e.value) and "layer_map=" in str(e.value)


def test_llama_like_family_is_recognised_by_layout():
    lm = make_tiny_model("llama")
    lm.model.config.model_type = "my-llama-finetune"
    assert layer_map_for(lm.model).block == LAYER_MAPS["llama"].block


def test_unknown_layer_suggests_close_names():
    lm = make_tiny_model("gpt2")
    with pytest.raises(UnknownLayerError, match="did you mean 'transformer.h.1.mlp'"):
        get_module(lm.model, "transformer.h.1.mpl")


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_are_what_the_blocks_read_and_edit(family):
    """Checked on a real forward: the embedding output (where trace noise goes) is what block 0 reads,
    scaled as it reads it (Gemma 3 multiplies by sqrt(hidden) inside its embedding module), and the
    MLP's output is the output of the projection ROME and MEMIT edit."""
    lm = make_tiny_model(family)
    ids = torch.tensor([lm.encode("The Eiffel Tower is located in the city of")])
    seen = {}

    def keep(name):
        def fn(h):
            seen[name] = h.detach().clone()
        return fn

    sites = [lm.layers.embed, lm.layers.name("mlp", 1), lm.layers.mlp_out_name(1)]
    with hooked(lm.model, outputs={s: keep(s) for s in sites}, inputs={lm.layers.block_name(0): keep("block0 in")}):
        lm.model(ids)
    # GPT-2 adds its learned position embeddings after the token embedding, as in ROME's noise site
    positions = lm.model.transformer.wpe.weight[: ids.shape[1]] if family == "gpt2" else 0
    assert torch.equal(seen[lm.layers.embed] + positions, seen["block0 in"])
    assert torch.equal(seen[lm.layers.name("mlp", 1)], seen[lm.layers.mlp_out_name(1)])
    raw = get_module(lm.model, lm.layers.embed).weight[ids[0]]
    if family == "gemma3_text":  # the scale is part of the embedding module's output
        assert torch.allclose(seen[lm.layers.embed][0], raw * lm.hidden_size ** 0.5, rtol=1e-6)
    else:
        assert torch.equal(seen[lm.layers.embed][0], raw)
