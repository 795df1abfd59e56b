"""tracer/files.py: atomic writers and the stray-temporary-file rule that shards rely on."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from tracer.files import (save_safetensors_atomic, stray_writer_dead, temporary_name, write_atomic,
                          write_json_atomic, write_text_atomic)


def test_json_and_text_writers_give_exact_bytes_and_readable_files(tmp_path):
    obj = {"b": [1, 2.5], "a": {"z": None}}
    path = write_json_atomic(tmp_path / "deep" / "x.json", obj, sort_keys=True)
    assert path.read_text() == json.dumps(obj, sort_keys=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_json_atomic(path, {"p": path}, indent=1, default=str)
    assert json.loads(path.read_text()) == {"p": str(path)}
    write_text_atomic(tmp_path / "t.html", "é<b>", fsync=True)
    assert (tmp_path / "t.html").read_bytes() == "é<b>".encode()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "t.html", "x.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.json", "old")

    def half(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, half)
    with pytest.raises(TypeError):  # not JSON-serialisable: fails before any file is touched
        write_json_atomic(path, {"x": object()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_safetensors_round_trip(tmp_path):
    from safetensors import safe_open

    path = save_safetensors_atomic(tmp_path / "w.safetensors", {"w": torch.arange(6.0).view(2, 3)}, {"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("w"), torch.arange(6.0).view(2, 3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_stray_rule_spares_only_files_of_other_live_writers(tmp_path):
    assert temporary_name(tmp_path / "13.json") == tmp_path / f".13.json.{os.getpid()}.tmp"
    assert stray_writer_dead(temporary_name(tmp_path / "13.json"))  # our own: a leftover of this process
    assert stray_writer_dead(tmp_path / ".13.json.4194305.tmp")     # above Linux's pid_max: nobody
    assert stray_writer_dead(tmp_path / ".13.json.tmp")             # no pid at all
    assert stray_writer_dead(tmp_path / ".13.json.0.tmp")           # 0 would mean the process group
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not stray_writer_dead(tmp_path / f".13.json.{live.pid}.tmp")
    finally:
        live.kill()
        live.wait()
    assert stray_writer_dead(tmp_path / f".13.json.{live.pid}.tmp")
