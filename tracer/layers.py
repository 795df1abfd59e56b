"""Architecture as data: where each family keeps its embeddings, blocks, MLPs and head.

A :class:`LayerMap` names modules with ``{}`` standing for the layer index::

    lm = layer_map_for(model)             # picks the family's map and checks it
    lm.block(3)       -> "model.layers.3"
    lm.mlp_out(3)     -> "model.layers.3.mlp.down_proj"   (the ROME/MEMIT edit site)

Pass your own ``LayerMap`` to any public function for a family not listed in :data:`LAYER_MAPS`.

Gemma 3 uses Llama's module names, with two differences that decide where the sites are:

- its embedding module multiplies by sqrt(hidden) inside ``forward``; ``embed`` names that module,
  so noise is added to the scaled vectors the first block reads, and ``"3s"`` is estimated on
  them too (:func:`tracer.noise.subject_embedding_std` calls the same module);
- each block normalises the attention and MLP outputs before adding them to the residual stream
  (``post_attention_layernorm``, ``post_feedforward_layernorm``). ``mlp`` and ``attn`` name the
  modules *before* those norms: ``mlp``'s output is ``down_proj``'s, the space ROME's v* lives in,
  and restoring it at a token restores the norm's output there too (the norm acts per token), so
  traces are unchanged by the choice. An edit's delta at the MLP output therefore does *not* reach
  the block output unchanged, as it does in the other families.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from .errors import UnknownLayerError, UnsupportedArchitectureError

Kind = Literal["hidden", "mlp", "attn"]


@dataclass(frozen=True)
class LayerMap:
    """Module names of one transformer family.

    ``mlp_out_transposed`` is True where the MLP output projection stores its weight as
    ``[in, out]`` (GPT-2's ``Conv1D``) instead of ``nn.Linear``'s ``[out, in]``.
    """

    family: str
    embed: str
    block: str
    attn: str
    mlp: str
    mlp_out: str
    final_norm: str
    unembed: str
    backbone: str
    n_layers_attr: str = "num_hidden_layers"
    mlp_out_transposed: bool = False
    norm_kind: Literal["layernorm", "rmsnorm"] = "layernorm"
    #: the norm the MLP output passes before it joins the residual (Gemma 2/3's post-feed-forward
    #: norm, ``"{}"`` the layer); empty where the MLP output is added as it is
    mlp_post_norm: str = ""

    def name(self, kind: Kind, layer: int) -> str:
        """Module whose output is restored for ``kind`` at ``layer``."""
        template = {"hidden": self.block, "mlp": self.mlp, "attn": self.attn}[kind]
        return template.format(layer)

    def block_name(self, layer: int) -> str:
        return self.block.format(layer)

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def mlp_post_norm_name(self, layer: int) -> str | None:
        """The norm between the MLP output and the residual at ``layer``; None where there is none."""
        return self.mlp_post_norm.format(layer) if self.mlp_post_norm else None

    def n_layers(self, model: torch.nn.Module) -> int:
        return int(getattr(model.config, self.n_layers_attr))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerMap":
        return cls(**d)

    def with_family(self, family: str) -> "LayerMap":
        return replace(self, family=family)


_GPT2 = LayerMap(
    family="gpt2", embed="transformer.wte", block="transformer.h.{}", attn="transformer.h.{}.attn",
    mlp="transformer.h.{}.mlp", mlp_out="transformer.h.{}.mlp.c_proj", final_norm="transformer.ln_f",
    unembed="lm_head", backbone="transformer", n_layers_attr="n_layer", mlp_out_transposed=True,
)
_GPTJ = LayerMap(
    family="gptj", embed="transformer.wte", block="transformer.h.{}", attn="transformer.h.{}.attn",
    mlp="transformer.h.{}.mlp", mlp_out="transformer.h.{}.mlp.fc_out", final_norm="transformer.ln_f",
    unembed="lm_head", backbone="transformer", n_layers_attr="n_layer",
)
_NEOX = LayerMap(
    family="gpt_neox", embed="gpt_neox.embed_in", block="gpt_neox.layers.{}",
    attn="gpt_neox.layers.{}.attention", mlp="gpt_neox.layers.{}.mlp",
    mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h", final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head", backbone="gpt_neox",
)
_LLAMA = LayerMap(
    family="llama", embed="model.embed_tokens", block="model.layers.{}", attn="model.layers.{}.self_attn",
    mlp="model.layers.{}.mlp", mlp_out="model.layers.{}.mlp.down_proj", final_norm="model.norm",
    unembed="lm_head", backbone="model", norm_kind="rmsnorm",
)

#: Maps for the supported ``config.model_type`` values.
LAYER_MAPS: dict[str, LayerMap] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    **{t: _LLAMA.with_family(t) for t in ("llama", "mistral", "qwen2", "qwen3", "smollm3")},
    "gemma3_text": replace(_LLAMA.with_family("gemma3_text"), mlp_post_norm="model.layers.{}.post_feedforward_layernorm"),
}


def module_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()]


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called ``name``; :class:`UnknownLayerError` with suggestions if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnknownLayerError.for_name(name, module_names(model)) from None


def _matches(model: torch.nn.Module, lm: LayerMap) -> bool:
    names = set(module_names(model))
    probe = [lm.embed, lm.block_name(0), lm.name("attn", 0), lm.name("mlp", 0), lm.mlp_out_name(0),
             lm.final_norm, lm.unembed, lm.backbone, *filter(None, [lm.mlp_post_norm_name(0)])]
    return all(p in names for p in probe)


def layer_map_for(model: torch.nn.Module, layer_map: LayerMap | None = None) -> LayerMap:
    """The model's :class:`LayerMap`, checked against its modules.

    ``layer_map`` overrides the lookup by ``config.model_type``; a family not in
    :data:`LAYER_MAPS` whose module names match one of them (many Llama-style models) is accepted.
    """
    if layer_map is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        layer_map = LAYER_MAPS.get(model_type)
        if layer_map is None:
            for candidate in LAYER_MAPS.values():
                if _matches(model, candidate):
                    layer_map = candidate.with_family(str(model_type))
                    break
        if layer_map is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(LAYER_MAPS))} "
                "(and any model laid out like them). For another family pass "
                "layer_map=tracer.LayerMap(family=..., embed=..., block='...layers.{}', attn=..., mlp=..., "
                "mlp_out=..., final_norm=..., unembed=..., backbone=...)"
            )
    n = layer_map.n_layers(model)
    for name in (layer_map.embed, layer_map.final_norm, layer_map.unembed, layer_map.backbone):
        get_module(model, name)
    for layer in (0, n - 1):
        for name in (layer_map.block_name(layer), layer_map.name("attn", layer),
                     layer_map.name("mlp", layer), layer_map.mlp_out_name(layer)):
            get_module(model, name)
    return layer_map
