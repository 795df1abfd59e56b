"""The README and docs/: tables rendered from bench/results/*.json, true imports, a complete error table.

The committed docs must equal what ``bench/render_docs.py`` makes of the committed JSON, so a
number edited by hand fails here; a changed JSON figure changes its table row.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from widgets import cli  # the whole factscope program: engine and UI commands

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_docs = _load("render_docs")
results = _load("results")
DOCS = [ROOT / d for d in render_docs.DOCS]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_committed_docs_equal_their_rendering():
    stale = [str(d.relative_to(ROOT)) for d in DOCS if render_docs.render_text(d.read_text(encoding="utf-8"), d)
             != d.read_text(encoding="utf-8")]
    assert stale == [], f"run python bench/render_docs.py: {stale} differ from bench/results/*.json"


def test_every_table_has_its_result_and_every_result_a_table():
    used = set()
    for doc in DOCS:
        for name in render_docs.tables_in(doc.read_text(encoding="utf-8")):
            assert name in render_docs.RENDERERS, f"{doc.name}: no renderer for {name}"
            assert (RESULTS / f"{name}.json").is_file(), f"{doc.name}: bench/results/{name}.json is missing"
            used.add(name)
    assert {p.stem for p in RESULTS.glob("*.json")} == used
    assert {"trace_speed", "counterfact"} <= set(render_docs.tables_in(README))  # the two headline tables


def test_a_hand_edited_number_is_rendered_back():
    doc = ROOT / "README.md"
    assert "| batched | 43.6 s | 150 | 1,421 MiB |" in README
    edited = README.replace("| batched | 43.6 s |", "| batched | 40.0 s |")
    assert render_docs.render_text(edited, doc) == README


def test_a_row_follows_its_json(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    doc = ROOT / "README.md"
    before = render_docs.render_text(README, doc, folder)
    data = json.loads((folder / "counterfact.json").read_text(encoding="utf-8"))
    rome = next(r for r in data["figures"]["rows"] if r["method"] == "rome")
    assert rome["S"] == 82.4 and rome["ES"] == {"mean": 97.0, "std": 17.1}
    rome["S"], rome["ES"] = 12.3, {"mean": 45.6, "std": 7.8}
    (folder / "counterfact.json").write_text(json.dumps(data), encoding="utf-8")
    after = render_docs.render_text(README, doc, folder)
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == 1
    assert changed[0][0].startswith("| rome | 200 | 82.4 | 97.0 ± 17.1 |")
    assert changed[0][1].startswith("| rome | 200 | 12.3 | 45.6 ± 7.8 | 96.5 ± 14.6 |")


def test_speed_up_is_computed_from_the_times(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    data = json.loads((folder / "trace_speed.json").read_text(encoding="utf-8"))
    data["figures"]["batched"]["seconds"] = 18.64
    (folder / "trace_speed.json").write_text(json.dumps(data), encoding="utf-8")
    block = render_docs.render_block("trace_speed", ROOT / "README.md", folder)
    assert "| **speed-up** | **10.0×** |" in block and "| batched | 18.6 s | 150 |" in block


def test_results_carry_their_provenance():
    for path in RESULTS.glob("*.json"):
        r = json.loads(path.read_text(encoding="utf-8"))
        assert r["name"] == path.stem and r["command"] and r["date"] and isinstance(r["figures"], dict), path.name
        assert "machine" in r and "threads" in r, path.name
        if r["commit"] is None:  # not measured by write_result: says where it came from
            assert r["source"].startswith("transcribed from README at commit f395323; measured "), path.name


def test_write_result_records_commit_date_machine(tmp_path):
    path = results.write_result("probe", {"seconds": 1.5}, command="python bench/probe.py --n 2", threads=3,
                                results_dir=tmp_path)
    r = json.loads(path.read_text(encoding="utf-8"))
    assert path == tmp_path / "probe.json"
    assert r["figures"] == {"seconds": 1.5} and r["threads"] == 3 and r["command"] == "python bench/probe.py --n 2"
    assert re.fullmatch(r"[0-9a-f]{40}", r["commit"]) and isinstance(r["dirty"], bool)
    assert re.match(r"\d{4}-\d\d-\d\dT", r["date"]) and r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    with pytest.raises(ValueError, match="must be letters"):
        results.write_result("../escape", {}, results_dir=tmp_path)


# ------------------------------------------------------------------------------------- README


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _imports(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for block in _python_blocks(text):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                found.append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found += [(a.name, []) for a in node.names]
    return found


def test_readme_is_a_short_guide_with_the_two_commands_first():
    assert len(README.splitlines()) <= 200
    first_screen = README.split("\n## ")[0]
    commands = re.findall(r"^bash dev\.sh (\w+)", first_screen, re.M)
    assert commands == ["demo", "test"]
    dev = (ROOT / "dev.sh").read_text(encoding="utf-8")
    assert "  demo)" in dev and "  test)" in dev and "factscope report" in dev


def test_readme_imports_only_public_names():
    imports = _imports(README)
    assert imports, "the README has no Python quickstart"
    for module, names in imports:
        assert module in ("tracer", "tracer.edit", "widgets"), f"README imports from {module}"
        public = set(importlib.import_module(module).__all__)
        assert set(names) <= public, f"README imports private names {set(names) - public} from {module}"


def test_docs_imports_resolve():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for module, names in _imports(doc.read_text(encoding="utf-8")):
            mod = importlib.import_module(module)
            for name in names:
                assert hasattr(mod, name), f"{doc.name}: {module} has no {name}"


def test_readme_commands_table_lists_every_subcommand():
    parser = cli.build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    table = README.split("## Commands")[1].split("\n## ")[0]
    for name in choices:
        assert f"| `factscope {name}` |" in table, f"README's command table lacks factscope {name}"


def _error_classes() -> set[str]:
    names = set()
    for path in [*(ROOT / "tracer").rglob("*.py"), *(ROOT / "widgets").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and not node.name.startswith("_"):
                names.add(node.name)
    return names


def test_error_table_lists_every_error_class():
    classes = _error_classes()
    assert {"FactscopeError", "EditError", "DatasetError", "ExportError"} <= classes
    table = README.split("## Errors")[1].split("\n## ")[0]
    missing = [c for c in sorted(classes) if f"| `{c}` |" not in table]
    assert missing == [], f"README's error table lacks {missing}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_nothing_points_outside_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text and "/work/" not in text, doc.name
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)]*))?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve() if target else doc
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: link {target} leads nowhere inside the repository"
            if anchor:
                assert anchor in _anchors(path), f"{doc.name}: {target}#{anchor} names no heading"
