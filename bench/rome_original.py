"""ROME's own causal tracing code, imported from a checkout the user points to (nothing is copied).

    ct, notes = import_rome("/path/to/rome")              # experiments/causal_trace.py of kmeng01/rome
    scores = rome_trace(ct, lm, prompt, subject, kind="mlp", samples=10, noise=0.13)

What the timed path runs is ROME's code: ``calculate_hidden_flow`` → ``trace_important_states`` /
``trace_important_window`` → ``trace_with_patch`` with ``util.nethook.TraceDict``, ``make_inputs``
and ``predict_from_input``. Three things are adapted, each said in ``notes``:

- modules that ``causal_trace.py`` imports at the top but the tracing path never calls (``datasets``,
  ``matplotlib``, ``dsets``, ``rome.tok_dataset``, ``util.runningstats``: dataset loading, plotting,
  covariance) are replaced by empty stand-ins when they cannot be imported here;
- ``util/globals.py`` reads ``globals.yml`` from the working directory at import, so the import runs
  inside the checkout;
- ``make_inputs`` defaults to ``device="cuda"``: its default becomes the model's device; and
  ``layername`` knows only GPT-2/GPT-J/GPT-NeoX module names, so for other families (the embedded
  Llama-style SmolLM2) it is given factscope's layer map names, and ``ModelAndTokenizer``'s
  layer count (a GPT-only regular expression) is set from the model.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

#: modules causal_trace.py imports that the tracing path does not use, with the names it takes
UNUSED_IMPORTS = {
    "datasets": ["load_dataset"],
    "matplotlib": [],
    "matplotlib.pyplot": [],
    "dsets": ["KnownsDataset"],
    "rome.tok_dataset": ["TokenizedDataset", "dict_to_", "flatten_masked_batch", "length_collation"],
    "util.runningstats": ["Covariance", "tally"],
}


def _stand_in(name: str, attrs: list[str]) -> types.ModuleType:
    module = types.ModuleType(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{name} is not installed here; the causal tracing path does not need it")

    for attr in attrs:
        setattr(module, attr, unavailable)
    module.__path__ = []  # a package, so that submodules can be stood in for too
    return module


def import_rome(repo: "str | os.PathLike"):
    """``experiments.causal_trace`` from the ROME checkout ``repo``, and notes on what was adapted."""
    repo = Path(repo).resolve()
    if not (repo / "experiments" / "causal_trace.py").is_file():
        raise SystemExit(f"--rome-repo {repo}: no experiments/causal_trace.py there; pass a checkout of "
                         "https://github.com/kmeng01/rome")
    sys.path.insert(0, str(repo))
    notes, cwd = [], os.getcwd()
    os.chdir(repo)  # util/globals.py opens globals.yml relative to the working directory
    try:
        for name, attrs in UNUSED_IMPORTS.items():
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 (any import failure: stand in for it)
                for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                    del sys.modules[key]
                parent, _, child = name.rpartition(".")
                sys.modules[name] = _stand_in(name, attrs)
                if parent and parent in sys.modules:
                    setattr(sys.modules[parent], child, sys.modules[name])
                notes.append(f"{name}: stand-in ({type(e).__name__}: {str(e)[:60]})")
        ct = importlib.import_module("experiments.causal_trace")
    finally:
        os.chdir(cwd)
    return ct, notes


def rome_trace(ct, lm, prompt: str, subject: str, kind: str, samples: int, noise: float, window: int = 10):
    """ROME's ``calculate_hidden_flow`` for one kind (``hidden`` is ROME's ``kind=None``): its
    ``scores`` ("token layer"), with the model's layer map names where ROME's ``layername`` has none."""
    import torch

    original_layername = getattr(ct, "_original_layername", ct.layername)
    ct._original_layername = original_layername
    if hasattr(lm.model, "transformer") or hasattr(lm.model, "gpt_neox"):
        ct.layername = original_layername
    else:
        def layername(model, num, kind=None):
            return lm.layers.embed if kind == "embed" else lm.layers.name(kind or "hidden", num)

        ct.layername = layername
    ct.make_inputs.__defaults__ = (str(lm.device),)
    mt = ct.ModelAndTokenizer(model=lm.model, tokenizer=lm.tokenizer)
    mt.num_layers = lm.n_layers
    with torch.no_grad():
        result = ct.calculate_hidden_flow(mt, prompt, subject, samples=samples, noise=noise, window=window,
                                          kind=None if kind == "hidden" else kind)
    return result["scores"].numpy(), result


def notes_text(ct_notes: list[str], lm) -> list[str]:
    """Everything adapted for this model, for the result file."""
    out = list(ct_notes) + ["make_inputs: device default set to the model's device"]
    if not (hasattr(lm.model, "transformer") or hasattr(lm.model, "gpt_neox")):
        out.append(f"layername: factscope's {lm.layers.family} layer map names (ROME's knows GPT-2/GPT-J/GPT-NeoX only); "
                   "ModelAndTokenizer.num_layers set from the model")
    return out
