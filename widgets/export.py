"""Export notebooks, with their outputs and widget state, to HTML files that open offline.

    python -m widgets.export notebooks/tracing.ipynb --out out/      # executes, then exports
    factscope export notebooks/*.ipynb --out out/                      # same, via the CLI
    python -m widgets.export --strip notebooks/*.ipynb                 # strip outputs before committing

nbconvert's HTML loads require.js, MathJax and the widget manager from CDNs. Here require.js is
inlined, MathJax is dropped (factscope notebooks use no LaTeX), the widget manager
(``@jupyter-widgets/html-manager``'s ``embed-amd.js``) is embedded as a ``data:`` URL, and
jupyter_bokeh's widget module is defined inline, so the panels' Bokeh figures render from the
file alone. The two npm files are fetched once with ``npm pack`` into
``$FACTSCOPE_CACHE/js`` (or taken from ``$FACTSCOPE_JS_DIR``); the exported file needs nothing.

The JavaScript ends up in documents other people open, so it is pinned: each npm tarball must
have the integrity npm's registry lists for that exact version (:data:`NPM_INTEGRITY`), and every
file taken from it must have its SHA-256 in :data:`JS_SHA256` — checked when it is fetched and
again each time it is read, so a file changed in the cache is refused, never embedded.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tracer.errors import FactscopeError
from tracer.files import write_bytes_atomic, write_text_atomic
from tracer.models import cache_dir

log = logging.getLogger(__name__)

#: npm packages and the files taken from each (html-manager 1.x renders ipywidgets 8 state; its
#: icon fonts in woff2, the format Chromium and Firefox load first, are embedded as data URLs)
NPM_FILES = {
    "require.js": ("requirejs@2.3.8", r"package/require\.js"),
    "embed-amd.js": ("@jupyter-widgets/html-manager@1.0.15", r"package/dist/(embed-amd\.js|[0-9a-f]{20}\.woff2)"),
}
#: each tarball's integrity as npm's registry lists it (``npm view <spec> dist.integrity``)
NPM_INTEGRITY = {
    "requirejs@2.3.8":
        "sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==",
    "@jupyter-widgets/html-manager@1.0.15":
        "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
}
#: SHA-256 of every file taken from those tarballs (computed from the tarballs above)
JS_SHA256 = {
    "require.js": "c1fc6b1d53af7522f78d664922abb32acac64ed0ecccb8f907f1e6fc7262563a",
    "embed-amd.js": "ca87dff57c70ffb2658794fde0eab0e27e5f5472a1f5df7ab2b08e1039fc4b72",
    "1551f4f60c37af51121f.woff2": "9834b82ad26e2a37583d22676a12dd2eb0fe7c80356a2114d0db1aa8b3899537",
    "7a3337626410ca2f4071.woff2": "e42a88444448ac3d60549cc7c1ff2c8a9cac721034c073d80a14a44e79730cca",
    "d878b0a6a1144760244f.woff2": "8ea8791754915a898a3100e63e32978a6d1763be6df8e73a39d3a90d691cdeef",
}
_NO_MATHJAX = "factscope-no-mathjax"
_FONT_REF = re.compile(r'\b[A-Za-z_$]\.p\+"([0-9a-f]{20}\.woff2)"')


class ExportError(FactscopeError):
    """A notebook could not be exported (missing JavaScript files, execution failure)."""


def js_dir() -> Path:
    """Where the widget manager's JavaScript files are kept."""
    return Path(os.environ.get("FACTSCOPE_JS_DIR") or cache_dir() / "js")


def read_pinned(path: Path) -> bytes:
    """The bytes of ``path`` when its SHA-256 is the one pinned for its name in :data:`JS_SHA256`."""
    expected = JS_SHA256.get(path.name)
    if expected is None:
        raise ExportError(f"{path.name} is not one of the pinned files ({', '.join(JS_SHA256)})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ExportError(f"cannot read {path} ({e.strerror}); delete {path.parent} to fetch the files again") from None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise ExportError(f"{path} does not match its pinned SHA-256 (got {got[:16]}..., expected {expected[:16]}...); "
                          f"delete it to fetch {_package_of(path.name)} again")
    return data


def _package_of(name: str) -> str:
    """The npm package spec a pinned file comes from."""
    return NPM_FILES["require.js" if name == "require.js" else "embed-amd.js"][0]


def _files_of(js_name: str) -> list[str]:
    """The pinned files that one entry of :data:`NPM_FILES` provides (embed-amd.js: also its fonts)."""
    return [n for n in JS_SHA256 if (n == "require.js") == (js_name == "require.js")]


def offline_js(directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of ``require.js`` and ``embed-amd.js`` (its fonts beside it), fetched with
    ``npm pack`` if missing; every file is checked against its pinned SHA-256."""
    directory = Path(directory) if directory is not None else js_dir()
    paths = {name: directory / name for name in NPM_FILES}
    missing = [name for name in NPM_FILES if not all((directory / f).is_file() for f in _files_of(name))]
    if missing:
        _fetch(directory, missing)
    for name in NPM_FILES:
        for f in _files_of(name):
            read_pinned(directory / f)
    return paths


def _fetch(directory: Path, names: list[str]) -> None:
    """``npm pack`` the packages of ``names``; write their files into ``directory`` once verified."""
    npm = shutil.which("npm")
    if npm is None:
        raise ExportError(f"{', '.join(names)} not found in {directory} and npm is not installed; install npm "
                          f"(apt-get install npm) or set FACTSCOPE_JS_DIR to a folder with the files of "
                          f"{', '.join(NPM_FILES[m][0] for m in names)}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec, members = NPM_FILES[name]
            log.info("fetching %s with npm pack", spec)
            done = subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300)
            if done.returncode != 0 or not done.stdout.strip():
                raise ExportError(f"npm pack {spec} failed: {done.stderr.strip()[:200]}")
            tgz = (Path(tmp) / done.stdout.strip().splitlines()[-1]).read_bytes()
            integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode("ascii")
            if integrity != NPM_INTEGRITY[spec]:
                raise ExportError(f"npm pack {spec} gave a tarball whose integrity {integrity[:24]}... is not the "
                                  f"pinned {NPM_INTEGRITY[spec][:24]}...; nothing was written")
            files = {}
            with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
                for member in tar.getmembers():
                    if member.isfile() and re.fullmatch(members, member.name):
                        files[Path(member.name).name] = tar.extractfile(member).read()
            for file_name in _files_of(name):
                data = files.get(file_name)
                got = hashlib.sha256(data).hexdigest() if data is not None else "missing"
                if got != JS_SHA256[file_name]:
                    raise ExportError(f"{file_name} from {spec} does not match its pinned SHA-256 ({got[:16]}); "
                                      "nothing was written")
            for file_name in _files_of(name):
                write_bytes_atomic(directory / file_name, files[file_name])


def _widget_manager(js: dict[str, Path]) -> str:
    """embed-amd.js with its woff2 font references replaced by data URLs."""
    source = read_pinned(js["embed-amd.js"]).decode("utf-8")

    def embed(match: re.Match) -> str:
        font = js["embed-amd.js"].parent / match.group(1)
        if not font.is_file():
            raise ExportError(f"font {font} is missing; delete {font.parent} to fetch the widget manager again")
        return '"data:font/woff2;base64,' + base64.b64encode(read_pinned(font)).decode("ascii") + '"'

    return _FONT_REF.sub(embed, source)


def _jupyter_bokeh_module() -> str:
    """jupyter_bokeh's AMD module, named so the widget manager's require() finds it."""
    import jupyter_bokeh

    source = (Path(jupyter_bokeh.__file__).parent / "nbextension" / "index.js").read_text(encoding="utf-8")
    source = re.sub(r"//# sourceMappingURL=\S+\s*$", "", source)
    at = source.index("define(")
    return source[:at] + 'define("@bokeh/jupyter_bokeh",' + source[at + len("define("):]


def _inline_script(code: str) -> str:
    return "<script>" + code.replace("</script", "<\\/script") + "</script>"


def notebook_html(nb, js: dict[str, Path] | None = None) -> str:
    """HTML of an executed notebook (``nbformat`` node) with every script inlined."""
    from nbconvert import HTMLExporter

    js = js or offline_js()
    renderer = base64.b64encode(_widget_manager(js).encode("utf-8")).decode("ascii")
    exporter = HTMLExporter(template_name="lab")
    exporter.require_js_url = "factscope-require-js"
    exporter.mathjax_url = _NO_MATHJAX
    exporter.widget_renderer_url = "data:text/javascript;base64," + renderer
    body, _ = exporter.from_notebook_node(nb)
    require = _inline_script(read_pinned(js["require.js"]).decode("utf-8")) + _inline_script(_jupyter_bokeh_module())
    body = body.replace('<script src="factscope-require-js"></script>', require, 1)
    body = re.sub(r'<script src="%s">\s*</script>' % _NO_MATHJAX, "", body)
    leftover = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', body)
    if leftover:
        raise ExportError(f"the exported HTML still loads {leftover[:3]} from the network")
    return body


def export_notebook(notebook: str | os.PathLike, out: str | os.PathLike, *, execute: bool = True,
                    timeout: int = 900, js: dict[str, Path] | None = None) -> Path:
    """Execute ``notebook`` (in its own directory, widget state stored) and write offline HTML.

    ``out``: an ``.html`` file, or a directory (the file is named after the notebook).
    """
    import nbformat

    notebook = Path(notebook)
    if not notebook.is_file():
        raise ExportError(f"notebook {str(notebook)!r} does not exist")
    out = Path(out)
    if out.suffix != ".html":
        out = out / (notebook.stem + ".html")
    nb = nbformat.read(notebook, as_version=4)
    if execute:
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                                resources={"metadata": {"path": str(notebook.parent.resolve())}})
        try:
            client.execute()
        except CellExecutionError as e:
            raise ExportError(f"{notebook.name} failed while executing: {str(e).strip().splitlines()[-1][:300]}") from None
    write_text_atomic(out, notebook_html(nb, js))
    return out


def strip_outputs(notebook: str | os.PathLike) -> bool:
    """Remove outputs, execution counts and widget state in place (how notebooks are committed);
    returns whether the file changed."""
    import nbformat

    path = Path(notebook)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        write_text_atomic(path, after)
    return after != before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m widgets.export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export command's arguments (shared by ``python -m widgets.export`` and ``factscope export``)."""
    parser.add_argument("notebooks", nargs="+", help="notebooks to export")
    parser.add_argument("--out", default="out", help="directory (or .html file for one notebook); default out/")
    parser.add_argument("--no-execute", action="store_true", help="export the stored outputs without running")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    parser.add_argument("--strip", action="store_true", help="only strip outputs in place (before committing)")


def run(args: argparse.Namespace) -> int:
    if args.strip:
        for nb in args.notebooks:
            print(f"{'stripped' if strip_outputs(nb) else 'clean'}: {nb}")
        return 0
    if len(args.notebooks) > 1 and str(args.out).endswith(".html"):
        raise ExportError("--out must be a directory when exporting several notebooks")
    js = offline_js()
    for nb in args.notebooks:
        path = export_notebook(nb, args.out, execute=not args.no_execute, timeout=args.timeout, js=js)
        print(f"exported {nb} -> {path.resolve()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FactscopeError as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(2)
