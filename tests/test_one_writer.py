"""Every file the project writes goes through tracer/files.py: no module writes a file another way.

The check reads the source of ``tracer/``, ``widgets/`` and ``bench/`` (nothing is imported or run)
and lists each call that writes a file by itself: ``open``-like calls with a writing mode, the
``Path.write_*``/``touch`` methods, ``json.dump``/``pickle.dump``/``torch.save``/``numpy.save*``,
safetensors' ``save_file``, ``shutil`` copies and moves, ``os.open``/``os.rename``/``os.replace``,
``tempfile`` files, ``nbformat.write``, Bokeh's ``save``/``output_file``, ``save_pretrained``. Only
``tracer/files.py`` may make them, plus the short list below, each with its reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("tracer", "widgets", "bench")
WRITER = Path("tracer/files.py")

#: (file, call) -> why it is not a bypass
ALLOWED: dict[tuple[str, str], str] = {
    ("tracer/models.py", "config.save_pretrained"): "fills write_directory_atomic's new private folder",
    ("tracer/models.py", "tokenizer.save_pretrained"): "fills write_directory_atomic's new private folder",
    ("tracer/edit/ledger.py", "self.lm.model.save_pretrained"): "fills write_directory_atomic's new private folder",
    ("tracer/edit/ledger.py", "self.lm.tokenizer.save_pretrained"): "fills write_directory_atomic's new private folder",
    ("bench/gpu_suite.py", "config.save_pretrained"): "fills write_directory_atomic's new private folder",
    ("bench/gpu_suite.py", "fast.save_pretrained"): "fills write_directory_atomic's new private folder",
}

_ALWAYS_METHODS = {"write_text", "write_bytes", "touch", "save_pretrained", "save_file", "tofile"}
_OPENERS = {"open", "gzip.open", "bz2.open", "lzma.open", "io.open", "os.fdopen", "codecs.open"}
_ALWAYS = {
    "write_text", "write_bytes", "touch", "json.dump", "pickle.dump", "torch.save", "np.save", "np.savez",
    "np.savez_compressed", "numpy.save", "numpy.savez", "save_file", "safetensors.torch.save_file",
    "shutil.copy", "shutil.copy2", "shutil.copyfile", "shutil.copytree", "shutil.move", "os.open", "os.rename",
    "os.replace", "os.link", "os.symlink", "tempfile.mkstemp", "tempfile.NamedTemporaryFile", "mkstemp",
    "nbformat.write", "output_file", "bokeh.io.save", "bokeh.plotting.save", "save_pretrained", "tofile",
}


def _name(func: ast.expr) -> str:
    """``a.b.c`` for a call target (the last attribute alone when the base is not a plain name)."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
        return ".".join(reversed(parts))
    return parts[0] if parts else ""


def _mode(call: ast.Call, position: int) -> str | None:
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value.value if isinstance(kw.value, ast.Constant) else "?"
    if len(call.args) > position:
        arg = call.args[position]
        return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else "?"
    return None


def writes_in(source: str) -> list[tuple[int, str]]:
    """(line, call) for every call in ``source`` that writes a file by itself."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in _ALWAYS or last in _ALWAYS_METHODS:
            found.append((node.lineno, name))
        elif last in ("open", "fdopen") and not name.endswith("safe_open"):
            # open(path, mode) and module-level openers take the mode second; Path.open(mode) first
            mode = _mode(node, 1 if name in _OPENERS else 0)
            if mode is not None and any(c in mode for c in "wax+?"):
                found.append((node.lineno, f"{name}(mode={mode!r})"))
    return found


def test_the_scanner_finds_each_kind_of_bypass():
    src = "\n".join([
        "open(p, 'w')", "open(p, mode='ab')", "open(p)", "gzip.open(p, 'rt')", "gzip.open(p, 'wt')",
        "Path(p).write_text('x')", "p.write_bytes(b'')", "json.dump(o, f)", "json.dumps(o)", "torch.save(t, p)",
        "save_file(t, p)", "shutil.copy(a, b)", "os.replace(a, b)", "p.open('w')", "p.open()",
        "model.save_pretrained(d)", "nbformat.write(nb, p)", "np.save(p, a)", "os.fdopen(fd, 'w')",
        "open(p, m)",
    ])
    assert [line for line, _ in writes_in(src)] == [1, 2, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20]


def test_no_module_writes_a_file_but_through_the_one_writer():
    bypasses = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel == WRITER:
                continue
            for line, call in writes_in(path.read_text(encoding="utf-8")):
                if (rel.as_posix(), call.split("(")[0]) not in ALLOWED:
                    bypasses.append(f"{rel}:{line}: {call}")
    assert not bypasses, "write these through tracer/files.py:\n" + "\n".join(bypasses)
