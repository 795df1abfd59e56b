"""The import rules of the package, checked on the source (``ast``; nothing is imported):

- no import cycle among modules (function-local and ``TYPE_CHECKING`` imports count too);
- :mod:`tracer` never imports :mod:`widgets`;
- no import from a higher layer (:data:`LAYERS`, lowest first);
- no private name (``_x``) imported from another module;
- function-local imports only of the optional or heavy dependencies in :data:`LOCAL_IMPORTS_ALLOWED`.

What the code still breaks is listed in :data:`KNOWN_VIOLATIONS` (issue 16): the test fails on any
violation not listed and on any listed one that is gone, so the list only shrinks.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tracer", "widgets")

#: The layers, lowest first; a module may import from its own layer and the layers below. A module
#: belongs to the entry naming it or its closest enclosing package ("=name": that module alone).
#: Derived from the code: errors and files depend on nothing; architecture maps, data paths,
#: subjects, target text and trace results on those; hooks and model loading on the architecture;
#: noise, key statistics, known facts, averages, sampling and target scoring on models; tracing and the lens on all of that;
#: editing on tracing's building blocks; evaluation runs the editors; the ``tracer`` facade
#: re-exports; the engine's commands sit on the engine; the UI (figures, then panels and export,
#: then the UI's commands and the ``factscope`` entry point) sits on top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("tracer.errors", "tracer.files", "tracer.markdown"),
    ("tracer.limits", "tracer.layers", "tracer.datapaths", "tracer.subject", "tracer.targets", "tracer.trace_result"),
    ("tracer.hooks", "tracer.models", "tracer.placement", "tracer.spread", "tracer.progress"),
    ("tracer.noise", "tracer.corpus", "tracer.stats", "tracer.knowns", "tracer.aggregate", "tracer.generation",
     "tracer.scoring"),
    ("tracer.trace", "tracer.lens", "tracer.dataset_trace"),
    ("tracer.edit",),
    ("tracer.evaluate", "tracer.plan", "tracer.layer_sweep"),
    ("=tracer",),
    ("tracer.commands", "tracer.cli"),
    ("widgets.text", "widgets.palette", "widgets.figures", "widgets.summary", "widgets.page", "widgets.report",
     "widgets.aggregate_figures", "widgets.eval_page", "widgets.sweep_figures", "widgets.health_page"),
    ("widgets.panels", "widgets.export", "=widgets"),
    ("widgets.commands", "widgets.cli"),
)

#: top-level packages a function may import, each with why it is not imported at the top
LOCAL_IMPORTS_ALLOWED = {
    "transformers": "heavy (about 2 s): loaded only when a model is loaded, so `import tracer` stays fast",
    "huggingface_hub": "comes with transformers; needed only to look a model up in the Hugging Face cache",
    "nbformat": "heavy (about 2 s) and needed only to read or write notebooks (export, strip)",
    "nbconvert": "optional (the `test` extra): needed only to export notebooks",
    "nbclient": "optional (the `test` extra): needed only to execute notebooks",
    "jupyter_bokeh": "loads Bokeh and ipywidgets; `widgets.export` reads only its JavaScript file",
    "ray": "heavy (about 1 s) and needed only when work is spread over Ray workers (--ray)",
    "grp": "POSIX-only standard module (absent on Windows)",
    "pwd": "POSIX-only standard module (absent on Windows)",
}

#: Violations the code still has (none since issue 16's layered editing engine); an entry here must
#: come with the issue that removes it, and the test fails once it is gone.
KNOWN_VIOLATIONS: set[str] = set()


@dataclass(frozen=True)
class Import:
    module: str      # the importing module
    target: str      # the module imported (``from a import b``: ``a.b`` when that is a module, else ``a``)
    names: tuple     # the names taken from it (``from`` imports)
    local: bool      # inside a function
    line: int


def package_modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, (), inner, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    target, names = (sub, ()) if sub in modules else (base, (a.name,))
                    found.append(Import(module, target, names, inner, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return found


def all_imports() -> list[Import]:
    modules = package_modules()
    return [imp for m, p in modules.items() for imp in _imports(m, p, modules)]


def layer_of(module: str) -> int:
    best, where = -1, None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if entry.startswith("="):
                match = module == entry[1:]
            else:
                match = module == entry or module.startswith(entry + ".")
            if match and len(entry.lstrip("=")) > best:
                best, where = len(entry.lstrip("=")), i
    if where is None:
        raise AssertionError(f"module {module} is in no layer; add it to LAYERS in tests/test_imports.py")
    return where


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def violations(imports: list[Import]) -> dict[str, str]:
    """``violation -> where`` for every rule the imports break."""
    modules = package_modules()
    found: dict[str, str] = {}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        where = f"{modules[imp.module].relative_to(ROOT)}:{imp.line}"
        top = imp.target.split(".")[0]
        ours = imp.target in modules
        if ours and imp.target != imp.module:
            edges[imp.module].add(imp.target)
            if imp.module.split(".")[0] == "tracer" and top == "widgets":
                found.setdefault(f"ui: {imp.module} imports {imp.target}", where)
            elif layer_of(imp.target) > layer_of(imp.module):
                found.setdefault(f"upward: {imp.module} imports {imp.target}", where)
        for name in imp.names:
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                found.setdefault(f"private: {imp.module} imports {imp.target}.{name}", where)
        if imp.local and top not in LOCAL_IMPORTS_ALLOWED:
            found.setdefault(f"local: {imp.module} imports {imp.target if ours else top}", where)
    for comp in cycles(edges):
        found[f"cycle: {', '.join(comp)}"] = " <-> ".join(comp)
    return found


def test_every_module_has_a_layer():
    for module in package_modules():
        layer_of(module)


def test_imports_follow_the_rules():
    found = violations(all_imports())
    new = {v: w for v, w in found.items() if v not in KNOWN_VIOLATIONS}
    gone = KNOWN_VIOLATIONS - set(found)
    assert not new, "import rules broken (see tests/test_imports.py):\n" + "\n".join(f"  {v}  ({w})" for v, w in sorted(new.items()))
    assert not gone, ("fixed, well done; delete from KNOWN_VIOLATIONS in tests/test_imports.py:\n"
                      + "\n".join(f"  {v!r}," for v in sorted(gone)))


# ---------------------------------------------------------------- the checker itself, on planted code

def _check(tmp_path, monkeypatch, files: dict[str, str]) -> set[str]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    return set(violations(all_imports()))


def test_checker_finds_each_kind_of_violation(tmp_path, monkeypatch):
    found = _check(tmp_path, monkeypatch, {
        "tracer/errors.py": "from .files import write\n",
        "tracer/files.py": "def write():\n    from .errors import Oops\n",          # cycle through a local import
        "tracer/layers.py": "from .models import _private\n",                      # upward and private
        "tracer/models.py": "import json\ndef load():\n    import transformers\n",  # allowed local import
        "tracer/trace.py": "def f():\n    import json\n",                             # local import saving nothing
        "tracer/cli.py": "from widgets.report import save_report\n",                 # engine -> UI
        "widgets/report.py": "from tracer.errors import Oops\n",
    })
    assert found == {
        "cycle: tracer.errors, tracer.files",
        "local: tracer.files imports tracer.errors",
        "upward: tracer.layers imports tracer.models",
        "private: tracer.layers imports tracer.models._private",
        "local: tracer.trace imports json",
        "ui: tracer.cli imports widgets.report",
    }


def test_clean_code_passes_the_checker(tmp_path, monkeypatch):
    assert _check(tmp_path, monkeypatch, {
        "tracer/errors.py": "class Oops(Exception):\n    pass\n",
        "tracer/models.py": "from . import errors\nfrom .errors import Oops\ndef load():\n    import transformers\n",
        "widgets/cli.py": "from tracer import cli\nfrom tracer.models import load\n",
    }) == set()


def test_engine_imports_no_ui_library():
    code = ("import sys, tracer, tracer.edit, tracer.evaluate, tracer.cli; tracer.cli.build_parser(); "
            "loaded = {'bokeh', 'ipywidgets', 'jupyter_bokeh', 'widgets'} & set(sys.modules); "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", [["report"], ["export", "a.ipynb"], ["averages", "runs", "--html", "a.html"],
                                  ["trace-dataset", "--facts", "f.json", "--out", "o", "--html", "a.html"]])
def test_ui_commands_come_from_widgets_cli(argv, capsys):
    """The engine's parser alone has no UI command or --html; widgets.cli's has them, as users type them."""
    from tracer.cli import build_parser
    from widgets.cli import build_parser as full_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    args = full_parser().parse_args(argv)
    assert args.command == argv[0] and callable(args.func)
    if "--html" in argv:
        assert str(args.html) == "a.html" and args.on_averages is not None


def test_html_of_an_engine_command_is_checked_before_any_work(tmp_path, capsys):
    """`factscope averages DIR --html missing/x.html` fails in one line before reading DIR (which is not
    even a trace-dataset directory here), and the engine's own check still applies without --html."""
    from widgets.cli import main

    assert main(["averages", str(tmp_path), "--html", str(tmp_path / "missing" / "x.html")]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "averages.json").exists()
    assert main(["averages", str(tmp_path)]) == 2
    assert "not a `factscope trace-dataset` directory" in capsys.readouterr().err


def test_commands_without_ray_do_not_import_it(tiny_model_dir, tmp_path):
    """`factscope trace-dataset` and `factscope evaluate` without --ray never import Ray."""
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"known_id": 1, "subject": "Paris", "prompt": "Paris is the capital of"}]))
    cases = tmp_path / "cf.json"
    cases.write_text(json.dumps([{
        "case_id": 7, "pararel_idx": 0,
        "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P1", "subject": "The tower",
                              "target_new": {"str": "Rome", "id": "Q1"}, "target_true": {"str": "Paris", "id": "Q2"}},
        "paraphrase_prompts": ["People say that The tower is in"], "neighborhood_prompts": ["The museum is in"],
        "attribute_prompts": [], "generation_prompts": []}]))
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    runs = [["trace-dataset", *model, "--facts", str(facts), "--kind", "hidden", "--samples", "1", "--n-boot", "0",
             "--out", str(tmp_path / "traces")],
            ["evaluate", *model, "--method", "ft-l", "--dataset", "counterfact", "--data", str(cases), "--layer", "1",
             "--hparam", "steps=1", "--no-generation", "--out", str(tmp_path / "eval")]]
    code = (f"import sys; from tracer.cli import main; runs = {runs!r}; "
            "assert all(main(argv) == 0 for argv in runs); assert 'ray' not in sys.modules, 'ray was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "eval" / "cases" / "7.json").is_file() and (tmp_path / "traces" / "facts" / "1.json").is_file()
