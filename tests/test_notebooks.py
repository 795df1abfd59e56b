"""notebooks/: committed without outputs, import only tracer and widgets, run top to bottom."""
from __future__ import annotations

import ast
import json
import re

import pytest

from notebook_runs import NOTEBOOKS, executed

NAMES = ("tracing", "editing", "classroom", "mass_editing", "averages")


def _code_cells(name: str) -> list[dict]:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    for cell in _code_cells(name):
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: strip outputs before committing"
    assert "widgets" not in nb["metadata"], f"{name}: widget state is committed"


@pytest.mark.parametrize("name", NAMES)
def test_imports_only_from_tracer_and_widgets(name):
    roots = set()
    for cell in _code_cells(name):
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots.add((node.module or "").split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                pytest.fail(f"{name} defines {node.name}; move it into tracer/ or widgets/")
    assert roots <= {"tracer", "widgets"}, f"{name} imports {sorted(roots - {'tracer', 'widgets'})}"


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _text(nb) -> str:
    return "".join(o.get("text", "") for o in _outputs(nb))


def _assert_clean_run(nb, name):
    errors = [o for o in _outputs(nb) if o["output_type"] == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert any("application/vnd.bokehjs_exec.v0+json" in o.get("data", {}) for o in _outputs(nb)), "no Bokeh figure shown"


@pytest.mark.embedded
def test_tracing_notebook_runs():
    nb, seconds = executed("tracing")
    _assert_clean_run(nb, "tracing")
    text = _text(nb)
    assert "answer ' Paris'" in text and "= trace score" in text
    views = [o for o in _outputs(nb) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert views, "the TracePanel was not displayed"
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(m["model_name"] == "BokehModel" for m in state.values())
    print(f"tracing notebook: {seconds:.0f} s")


@pytest.mark.embedded
def test_classroom_notebook_runs():
    nb, seconds = executed("classroom")
    _assert_clean_run(nb, "classroom")
    assert "' Paris' is top-1 from layer" in _text(nb)
    print(f"classroom notebook: {seconds:.0f} s")


@pytest.mark.embedded
def test_editing_notebook_runs():
    nb, seconds = executed("editing")
    _assert_clean_run(nb, "editing")
    text = _text(nb)
    assert "after undo the model answers ' Paris'" in text
    assert "= the strongest MLP layer of the trace" in text  # the edit panel follows the trace panel
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert sum(m["model_name"] == "BokehModel" for m in state.values()) >= 2  # the trace panel's heat map, the lens view
    print(f"editing notebook: {seconds:.0f} s")


@pytest.mark.embedded
def test_mass_editing_notebook_runs():
    """Issue 20: a MEMIT batch of 100 CounterFact facts on the CPU with the health read-out; most edits
    take, the edited matrices grow, and reverting gives the scores of the unedited model back."""
    nb, seconds = executed("mass_editing")
    _assert_clean_run(nb, "mass_editing")
    text = _text(nb)
    took = int(re.search(r"new answer preferred after the edit: (\d+) of 100", text).group(1))
    before = int(re.search(r"new answer preferred before the edit: (\d+) of 100", text).group(1))
    assert took >= 80 and took > before + 30, (before, took)  # measured: 38 -> 98 (docs/panels.md)
    kept = int(re.search(r"neighbouring prompts that keep the true answer: (\d+) of 100", text).group(1))
    assert kept >= 50, kept  # measured: 63 (64 before the edit)
    growth = [float(x) for x in re.findall(r"largest norm ratio ([\d.]+)", text)]
    assert growth[0] == 1.0 and growth[1] > 1.0
    assert "after revert, scores equal those before the edit: True" in text
    print(f"mass-editing notebook: {seconds:.0f} s")


@pytest.mark.embedded
def test_averages_notebook_runs():
    """Issue 20: the dataset averages of 20 known facts, traced and averaged in the notebook."""
    nb, seconds = executed("averages")
    _assert_clean_run(nb, "averages")
    text = _text(nb)
    assert "20 traced, 0 already done, 0 failed" in text
    peaks = {k: (int(layer), float(v)) for k, layer, v in
             re.findall(r"(hidden|mlp|attn)\s+last subject token: layer (\d+) \((-?[\d.]+)\)", text)}
    assert set(peaks) == {"hidden", "mlp", "attn"}
    # as over 279 known facts (bench/results/known_facts_averages.json: MLP peak at layer 4, 0.083;
    # attention at most 0.011): at the last subject token the early MLPs carry the effect
    assert peaks["mlp"][0] <= 8 and peaks["mlp"][1] > 2 * peaks["attn"][1], peaks
    print(f"averages notebook: {seconds:.0f} s")


def test_strip_outputs(tmp_path):
    import nbformat

    from widgets.export import strip_outputs

    nb = nbformat.read(NOTEBOOKS / "tracing.ipynb", as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="hello")]
    nb.cells[1].execution_count = 3
    nb.metadata["widgets"] = {"state": {}}
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert strip_outputs(path) is True
    back = nbformat.read(path, as_version=4)
    assert back.cells[1].outputs == [] and back.cells[1].execution_count is None and "widgets" not in back.metadata
    assert strip_outputs(path) is False
