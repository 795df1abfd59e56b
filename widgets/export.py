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
"""
from __future__ import annotations

import argparse
import base64
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

log = logging.getLogger(__name__)

#: npm packages and the files taken from each (html-manager 1.x renders ipywidgets 8 state; its
#: icon fonts in woff2, the format Chromium and Firefox load first, are embedded as data URLs)
NPM_FILES = {
    "require.js": ("requirejs@2.3.8", r"package/require\.js"),
    "embed-amd.js": ("@jupyter-widgets/html-manager@1.0.15", r"package/dist/(embed-amd\.js|[0-9a-f]{20}\.woff2)"),
}
_NO_MATHJAX = "factscope-no-mathjax"
_FONT_REF = re.compile(r'\b[A-Za-z_$]\.p\+"([0-9a-f]{20}\.woff2)"')


class ExportError(FactscopeError):
    """A notebook could not be exported (missing JavaScript files, execution failure)."""


def js_dir() -> Path:
    """Where the widget manager's JavaScript files are kept."""
    from tracer.models import cache_dir

    return Path(os.environ.get("FACTSCOPE_JS_DIR") or cache_dir() / "js")


def offline_js(directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of ``require.js`` and ``embed-amd.js`` (its fonts beside it), fetched with
    ``npm pack`` if missing."""
    directory = Path(directory) if directory is not None else js_dir()
    paths = {name: directory / name for name in NPM_FILES}
    fonts_missing = not list(directory.glob("*.woff2"))
    missing = [name for name, p in paths.items()
               if not p.is_file() or p.stat().st_size == 0 or (name == "embed-amd.js" and fonts_missing)]
    if not missing:
        return paths
    npm = shutil.which("npm")
    if npm is None:
        raise ExportError(f"{', '.join(missing)} not found in {directory} and npm is not installed; install npm "
                          f"(apt-get install npm) or set FACTSCOPE_JS_DIR to a folder with the files of "
                          f"{', '.join(NPM_FILES[m][0] for m in missing)}")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in missing:
            spec, members = NPM_FILES[name]
            log.info("fetching %s with npm pack", spec)
            done = subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise ExportError(f"npm pack {spec} failed: {done.stderr.strip()[:200]}")
            tgz = Path(tmp) / done.stdout.strip().splitlines()[-1]
            with tarfile.open(tgz) as tar:
                for member in tar.getmembers():
                    if member.isfile() and re.fullmatch(members, member.name):
                        part = directory / (Path(member.name).name + ".part")
                        part.write_bytes(tar.extractfile(member).read())
                        part.replace(directory / Path(member.name).name)
    return paths


def _widget_manager(js: dict[str, Path]) -> str:
    """embed-amd.js with its woff2 font references replaced by data URLs."""
    source = js["embed-amd.js"].read_text(encoding="utf-8")

    def embed(match: re.Match) -> str:
        font = js["embed-amd.js"].parent / match.group(1)
        if not font.is_file():
            raise ExportError(f"font {font} is missing; delete {font.parent} to fetch the widget manager again")
        return '"data:font/woff2;base64,' + base64.b64encode(font.read_bytes()).decode("ascii") + '"'

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
    require = _inline_script(js["require.js"].read_text(encoding="utf-8")) + _inline_script(_jupyter_bokeh_module())
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(notebook_html(nb, js), encoding="utf-8")
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
        path.write_text(after, encoding="utf-8")
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
