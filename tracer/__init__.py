"""factscope's engine: locate (causal tracing) and edit (ROME, MEMIT) facts in language models.

    from tracer import load_model, trace_all, rome_edit, EditRequest, edited
    lm = load_model("smollm2-135m")
    traces = trace_all(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    record = rome_edit(lm, EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome"))
    with edited(lm, [record]):
        ...

Imports nothing from a UI library and nothing from :mod:`widgets` (tests/test_imports.py). The names
below are the public API; each module documents the rest (``tracer.stats``, ``tracer.aggregate``, ``tracer.dataset_trace``, ``tracer.evaluate``).
"""
from .edit import (EditRecord, EditRequest, Ledger, MemitHyperParams, MemitRecord, ROMEHyperParams, check_edit, compute_memit,
                   defaults_for, edited, rome_edit, sequential_memit)
from .errors import FactscopeError
from .hooks import hooked
from .layers import LAYER_MAPS, LayerMap
from .lens import LensResult, logit_lens
from .models import LanguageModel, load_model
from .subject import find_subject_span
from .trace import trace, trace_all
from .trace_result import NoiseSpec, TraceResult, suggest_layer

__all__ = [
    "EditRecord", "EditRequest", "Ledger", "MemitHyperParams", "MemitRecord", "ROMEHyperParams", "check_edit",
    "compute_memit", "defaults_for", "edited", "rome_edit", "sequential_memit",
    "FactscopeError", "hooked", "LAYER_MAPS", "LayerMap", "LensResult", "logit_lens", "LanguageModel",
    "load_model", "find_subject_span", "trace", "trace_all", "NoiseSpec", "TraceResult", "suggest_layer",
]
