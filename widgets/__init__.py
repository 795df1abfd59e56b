"""Notebook panels, Bokeh figures and offline HTML reports on top of :mod:`tracer`.

    from widgets import TracePanel, save_report
    TracePanel("smollm2-135m")            # in JupyterLab
    save_report("report.html", model=..., traces=...)

Figures are pure functions of results (:mod:`widgets.figures`); panels (:mod:`widgets.panels`)
compute through :mod:`tracer` and update the figures' data in place; :mod:`widgets.report`
writes standalone HTML; :mod:`widgets.export` exports executed notebooks to offline HTML.
:mod:`widgets.commands` holds the ``factscope`` commands that draw HTML or run notebooks, and
:mod:`widgets.cli` (the ``factscope`` program) registers them with :mod:`tracer.cli`.
``suggest_layer`` is the engine's (:func:`tracer.trace_result.suggest_layer`), re-exported.
Names are imported on first use, so ``import widgets.export`` does not load Bokeh or ipywidgets.
"""
from importlib import import_module

_WHERE = {
    "trace_heatmap": "figures", "update_trace_heatmap": "figures", "trace_grid": "figures",
    "lens_figure": "figures", "update_lens_figure": "figures", "lens_comparison": "figures",
    "edit_comparison": "figures", "update_edit_comparison": "figures", "trace_difference": "figures",
    "trace_comparison": "figures", "update_trace_comparison": "figures",
    "health_page": "health_page", "write_health_html": "health_page",
    "save_report": "report", "report_html": "report", "build_report": "report", "report_page": "report",
    "Page": "page", "eval_page": "eval_page",
    "TracePanel": "panels", "EditPanel": "panels", "LensPanel": "panels", "setup_notebook": "panels",
    "suggest_layer": "panels", "show": "panels", "export_notebook": "export",
    "literal": "text", "plain": "text", "html_div": "text",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'widgets' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
