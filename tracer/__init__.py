"""factscope's engine: locate (causal tracing) and edit (ROME, MEMIT) facts in language models.

    from tracer import load_model, trace_all
    lm = load_model("smollm2-135m")
    traces = trace_all(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")

Imports nothing from a UI library. Names below are the public API; modules hold the rest.
"""
from .errors import FactscopeError
from .hooks import hooked
from .layers import LAYER_MAPS, LayerMap
from .models import LanguageModel, load_model
from .subject import find_subject_span
from .trace import trace, trace_all
from .trace_result import NoiseSpec, TraceResult

__all__ = [
    "FactscopeError", "hooked", "LAYER_MAPS", "LayerMap", "LanguageModel", "load_model",
    "find_subject_span", "trace", "trace_all", "NoiseSpec", "TraceResult",
]
