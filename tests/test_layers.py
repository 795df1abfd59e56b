"""tracer/layers.py: per-family layer maps, checked against real modules."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_tiny_model
from tracer.errors import UnknownLayerError, UnsupportedArchitectureError
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
