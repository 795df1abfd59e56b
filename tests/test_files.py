"""tracer/files.py: the one atomic writer (no symlink following, umask modes, exclusive creation)
and the stray-temporary-file rule that resumed runs rely on."""
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from tracer import files
from tracer.files import (host_id, open_append, save_safetensors_atomic, stray_writer_dead, temporary_name,
                          write_atomic, write_json_atomic, write_text_atomic)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)
    yield set_
    os.umask(old)


def test_json_and_text_writers_give_exact_bytes(tmp_path, umask):
    umask(0o022)
    obj = {"b": [1, 2.5], "a": {"z": None}}
    path = write_json_atomic(tmp_path / "deep" / "x.json", obj, sort_keys=True)
    assert path.read_text() == json.dumps(obj, sort_keys=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_json_atomic(path, {"p": path}, indent=1, default=str)
    assert json.loads(path.read_text()) == {"p": str(path)}
    write_text_atomic(tmp_path / "t.html", "é<b>")
    assert (tmp_path / "t.html").read_bytes() == "é<b>".encode()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "t.html", "x.json"]


def test_mode_follows_the_umask_and_is_never_forced(tmp_path, umask):
    umask(0o077)
    private = write_text_atomic(tmp_path / "private.json", "{}")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    umask(0o002)
    shared = save_safetensors_atomic(tmp_path / "w.safetensors", {"w": torch.zeros(2)}, {})
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path, umask):
    umask(0o022)
    victim = tmp_path / "elsewhere" / "secret"
    victim.parent.mkdir()
    victim.write_text("keep me")
    victim.chmod(0o600)
    (tmp_path / "out.json").symlink_to(victim)
    write_text_atomic(tmp_path / "out.json", "new")
    assert victim.read_text() == "keep me" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_text() == "new"


def test_a_planted_temporary_name_is_never_opened(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    victim.chmod(0o600)
    tokens = iter(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(tokens))
    planted = tmp_path / f".out.json~{host_id()}~{os.getpid()}~aaaaaaaaaaaaaaaa.tmp"
    planted.symlink_to(victim)  # an attacker guessed the first name
    write_text_atomic(tmp_path / "out.json", "new")
    assert victim.read_text() == "keep me" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert planted.is_symlink() and (tmp_path / "out.json").read_text() == "new"


def test_temporary_names_are_unpredictable_and_name_their_writer(tmp_path):
    a, b = temporary_name(tmp_path / "13.json"), temporary_name(tmp_path / "13.json")
    assert a != b and a.parent == tmp_path
    assert a.name.startswith(f".13.json~{host_id()}~{os.getpid()}~") and a.name.endswith(".tmp")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.json", "old")

    def half(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(path, half)
    with pytest.raises(TypeError):  # not JSON-serialisable: fails before any file is touched
        write_json_atomic(path, {"x": object()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_exclusive_refuses_an_existing_target_and_leaves_it(tmp_path):
    path = write_json_atomic(tmp_path / "run.json", {"samples": 10}, exclusive=True)
    with pytest.raises(FileExistsError):
        write_json_atomic(path, {"samples": 3}, exclusive=True)
    (tmp_path / "link.json").symlink_to(tmp_path / "missing")  # a dangling symlink counts as there
    with pytest.raises(FileExistsError):
        write_text_atomic(tmp_path / "link.json", "x", exclusive=True)
    assert json.loads(path.read_text()) == {"samples": 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "run.json"]


def _race(args):
    path, value = args
    try:
        write_json_atomic(path, {"writer": value}, exclusive=True)
        return value
    except FileExistsError:
        return None


def test_of_concurrent_exclusive_writers_exactly_one_wins(tmp_path):
    path = str(tmp_path / "run.json")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        winners = [w for w in pool.map(_race, [(path, i) for i in range(16)]) if w is not None]
    assert len(winners) == 1
    assert json.loads((tmp_path / "run.json").read_text()) == {"writer": winners[0]}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_safetensors_round_trip(tmp_path, umask):
    from safetensors import safe_open

    umask(0o022)
    path = save_safetensors_atomic(tmp_path / "w.safetensors", {"w": torch.arange(6.0).view(2, 3)}, {"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("w"), torch.arange(6.0).view(2, 3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_append_log_adds_lines_and_refuses_a_symlink(tmp_path):
    log = tmp_path / "log.jsonl"
    for i in range(2):
        with open_append(log) as f:
            f.write(f"{i}\n")
    assert log.read_text() == "0\n1\n"
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "evil.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        with open_append(tmp_path / "evil.jsonl") as f:
            f.write("x\n")
    assert victim.read_text() == "keep me"


def _name(host, pid, name="13.json"):
    return f".{name}~{host}~{pid}~0123456789abcdef.tmp"


def test_stray_rule_on_this_host_asks_whether_the_writer_lives(tmp_path):
    assert stray_writer_dead(temporary_name(tmp_path / "13.json"))  # our own: a leftover of this process
    assert stray_writer_dead(tmp_path / _name(host_id(), 4194305))  # above Linux's pid_max: nobody
    assert stray_writer_dead(tmp_path / _name(host_id(), 0))        # 0 would mean the process group
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not stray_writer_dead(tmp_path / _name(host_id(), live.pid))
    finally:
        live.kill()
        live.wait()
    assert stray_writer_dead(tmp_path / _name(host_id(), live.pid))


def test_stray_rule_for_other_hosts_and_old_names_goes_by_age(tmp_path):
    other = tmp_path / _name("node7-0badcafe", 1)  # pid 1 lives here, but it is another machine's
    legacy = tmp_path / ".13.json.4194305.tmp"   # written before names carried a host
    for p in (other, legacy):
        p.write_text("partial")
        assert not stray_writer_dead(p)
        old = time.time() - 2 * files.STALE_AFTER
        os.utime(p, (old, old))
        assert stray_writer_dead(p)
    assert stray_writer_dead(tmp_path / _name("node7-0badcafe", 1, "gone.json"))  # already removed


def test_directory_writer_puts_a_whole_folder_in_place_or_nothing(tmp_path, umask):
    from tracer.files import write_directory_atomic

    umask(0o022)

    def fill(d):
        (d / "sub").mkdir()
        write_text_atomic(d / "sub" / "a.txt", "a")

    target = write_directory_atomic(tmp_path / "model", fill)
    assert (target / "sub" / "a.txt").read_text() == "a" and stat.S_IMODE(target.stat().st_mode) == 0o755
    with pytest.raises(FileExistsError):
        write_directory_atomic(target, fill)
    assert write_directory_atomic(target, lambda d: pytest.fail("must not fill"), exist_ok=True) == target

    def broken(d):
        write_text_atomic(d / "half.txt", "x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_directory_atomic(tmp_path / "other", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    def raced(d):  # another process finishes the same folder while we fill ours
        (tmp_path / "raced").mkdir()
        write_text_atomic(tmp_path / "raced" / "theirs.txt", "theirs")

    assert write_directory_atomic(tmp_path / "raced", raced, exist_ok=True) == tmp_path / "raced"
    assert [p.name for p in (tmp_path / "raced").iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "raced"]
