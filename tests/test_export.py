"""widgets.export: the two npm files are pinned by hash, checked when fetched and on every use."""
from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

import widgets.export as export
from widgets.export import ExportError


def _real_js_dir() -> Path | None:
    """A folder with the real pinned files (fetched by .ci/browser-setup.sh), or None."""
    directory = export.js_dir()
    try:
        for name in export.JS_SHA256:
            export.read_pinned(directory / name)
    except ExportError:
        return None
    return directory


def test_pins_cover_every_file_the_export_embeds():
    assert set(export.NPM_INTEGRITY) == {spec for spec, _ in export.NPM_FILES.values()}
    assert sorted(export._files_of("require.js")) == ["require.js"]
    fonts = [n for n in export._files_of("embed-amd.js") if n.endswith(".woff2")]
    assert len(fonts) == 3 and "embed-amd.js" in export._files_of("embed-amd.js")
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in export.JS_SHA256.values())


@pytest.mark.skipif(_real_js_dir() is None, reason="the widget manager's files are not fetched (.ci/browser-setup.sh)")
def test_changed_cache_files_are_refused_on_every_use(tmp_path):
    js = tmp_path / "js"
    shutil.copytree(_real_js_dir(), js)
    paths = export.offline_js(js)
    manager = export._widget_manager(paths)
    references = export._FONT_REF.findall((js / "embed-amd.js").read_text())
    assert len(references) == 6 and len(set(references)) == 3  # each of the three fonts, twice
    assert manager.count('"data:font/woff2;base64,') == 6 and not export._FONT_REF.search(manager)
    # someone appends script to the cached require.js: refused when the cache is opened
    original = (js / "require.js").read_bytes()
    (js / "require.js").write_bytes(original + b"\ndocument.title = 'owned';")
    with pytest.raises(ExportError, match=r"require.js does not match its pinned SHA-256.*requirejs@2.3.8") as e:
        export.offline_js(js)
    assert "\n" not in str(e.value)
    (js / "require.js").write_bytes(original)
    # ... and a font changed after offline_js() checked it is refused when it is embedded
    paths = export.offline_js(js)
    font = next(js.glob("*.woff2"))
    font.write_bytes(font.read_bytes()[:-1])
    with pytest.raises(ExportError, match=f"{font.name} does not match its pinned SHA-256"):
        export._widget_manager(paths)


def _tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """An ``npm`` on PATH whose ``pack SPEC`` hands out the tarball the test put in ``packs[SPEC]``."""
    packs = tmp_path / "packs"
    packs.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!{sys.executable}\n"
                   "import os, shutil, sys\n"
                   "name = sys.argv[2].replace('@', '').replace('/', '-') + '.tgz'\n"
                   f"shutil.copy(os.path.join({str(packs)!r}, name), name)\n"
                   "print(name)\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def put(spec: str, files: dict[str, bytes]) -> bytes:
        data = _tarball(files)
        (packs / (spec.replace("@", "").replace("/", "-") + ".tgz")).write_bytes(data)
        return data

    return put


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def test_a_fetched_tarball_that_is_not_the_pinned_one_writes_nothing(fake_npm, tmp_path):
    fake_npm("requirejs@2.3.8", {"package/require.js": b"document.title = 'owned';"})
    fake_npm("@jupyter-widgets/html-manager@1.0.15", {"package/dist/embed-amd.js": b"define([], {});"})
    js = tmp_path / "js"
    with pytest.raises(ExportError, match=r"npm pack requirejs@2.3.8 gave a tarball whose integrity .* is not the pinned"):
        export.offline_js(js)
    assert not js.exists() or not list(js.iterdir())


def test_fetch_checks_each_file_and_writes_the_pinned_ones(fake_npm, tmp_path, monkeypatch):
    require, manager = b"var requirejs = 1;", b'define([], function(){ return a.p+"0123456789abcdef0123.woff2"; });'
    font = b"wOF2 font bytes"
    good = {"require.js": require, "embed-amd.js": manager, "0123456789abcdef0123.woff2": font}
    monkeypatch.setattr(export, "JS_SHA256", {k: hashlib.sha256(v).hexdigest() for k, v in good.items()})
    tgz_r = fake_npm("requirejs@2.3.8", {"package/require.js": require, "package/README.md": b"x"})
    tampered = {"package/dist/embed-amd.js": manager + b"//", "package/dist/0123456789abcdef0123.woff2": font}
    tgz_m = fake_npm("@jupyter-widgets/html-manager@1.0.15", tampered)
    # the registry's integrity for the tarball matches, but a file in it is not the pinned one
    monkeypatch.setattr(export, "NPM_INTEGRITY", {"requirejs@2.3.8": _integrity(tgz_r),
                                                  "@jupyter-widgets/html-manager@1.0.15": _integrity(tgz_m)})
    js = tmp_path / "js"
    with pytest.raises(ExportError, match="embed-amd.js from @jupyter-widgets/html-manager@1.0.15 does not match"):
        export.offline_js(js)
    assert sorted(p.name for p in js.iterdir()) == ["require.js"]  # the verified package only
    tgz_m = fake_npm("@jupyter-widgets/html-manager@1.0.15",
                     {"package/dist/embed-amd.js": manager, "package/dist/0123456789abcdef0123.woff2": font})
    monkeypatch.setitem(export.NPM_INTEGRITY, "@jupyter-widgets/html-manager@1.0.15", _integrity(tgz_m))
    paths = export.offline_js(js)
    assert {p.name: p.read_bytes() for p in js.iterdir()} == good
    assert export._widget_manager(paths).endswith(
        'return "data:font/woff2;base64,' + base64.b64encode(font).decode() + '"; });')


def test_export_writes_through_the_atomic_writer(tmp_path, monkeypatch):
    """The exported HTML and a stripped notebook replace a planted symlink instead of writing through it."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1", execution_count=1,
                                                                   outputs=[nbformat.v4.new_output("execute_result",
                                                                                                   data={"text/plain": "2"},
                                                                                                   execution_count=1)])])
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out" / "n.html"
    out.parent.mkdir()
    out.symlink_to(victim)
    monkeypatch.setattr(export, "notebook_html", lambda nb, js=None: "<html>exported</html>")
    assert export.export_notebook(path, out, execute=False) == out
    assert victim.read_text() == "keep me" and not out.is_symlink() and out.read_text() == "<html>exported</html>"
    assert export.strip_outputs(path) is True
    assert nbformat.read(path, as_version=4).cells[0].outputs == []
