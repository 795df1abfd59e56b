"""tracer.datapaths: explicit paths first, then $FACTSCOPE_DATA, then a checked ../shared/data."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import tracer.datapaths as dp
from tracer.errors import DatasetError


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A fake ``<parent>/shared/data`` beside a checkout, private to this user, as the fallback."""
    parent = tmp_path / "parent"
    data = parent / "shared" / "data"
    (data / "wikipedia").mkdir(parents=True)
    (data / dp.KNOWNS).write_text(json.dumps([{"subject": "Paris", "template": "{} is in", "attribute": "France"}]))
    for p in (parent, parent / "shared", data, data / "wikipedia"):
        p.chmod(0o755)
    (data / dp.KNOWNS).chmod(0o644)
    monkeypatch.setattr(dp, "checkout_data_dir", lambda: data)
    monkeypatch.delenv(dp.DATA_ENV, raising=False)
    monkeypatch.delenv("FACTSCOPE_CORPUS", raising=False)
    return data


def test_order_explicit_file_then_folder_then_environment_then_checkout(checkout, tmp_path, monkeypatch):
    assert dp.data_file(dp.KNOWNS) == checkout / dp.KNOWNS
    mine = tmp_path / "mine"
    monkeypatch.setenv(dp.DATA_ENV, str(mine))
    assert dp.data_file(dp.KNOWNS) == mine / dp.KNOWNS
    assert dp.data_file(dp.KNOWNS, folder=tmp_path / "f") == tmp_path / "f" / dp.KNOWNS
    assert dp.data_file(dp.KNOWNS, tmp_path / "x.json", folder=tmp_path / "f") == tmp_path / "x.json"


@pytest.mark.parametrize("where, mode", [("parent", 0o777), ("shared", 0o757), ("data", 0o775), ("file", 0o666),
                                         ("file", 0o646)])
def test_writable_by_others_is_refused(checkout, where, mode):
    path = {"parent": checkout.parents[1], "shared": checkout.parent, "data": checkout,
            "file": checkout / dp.KNOWNS}[where]
    path.chmod(mode)
    if not mode & stat.S_IWOTH:  # writable by its group: a group shared with others, not the user's own
        if os.geteuid() != 0:
            pytest.skip("giving a file another group needs root")
        os.chown(path, -1, 65534)
    with pytest.raises(DatasetError, match=f"{path} is writable by .*set FACTSCOPE_DATA") as e:
        dp.data_file(dp.KNOWNS)
    assert "\n" not in str(e.value)


def test_the_users_own_private_group_may_write(checkout):
    """umask 002 systems give each user a private group: its write bit lets nobody else in."""
    import grp
    import pwd

    own = grp.getgrgid(os.getgid())
    if own.gr_name != pwd.getpwuid(os.getuid()).pw_name or set(own.gr_mem) - {own.gr_name}:
        pytest.skip("this user has no private group")
    checkout.chmod(0o775)
    (checkout / dp.KNOWNS).chmod(0o664)
    assert dp.data_file(dp.KNOWNS) == checkout / dp.KNOWNS


def test_sticky_folder_and_missing_parts_are_accepted(checkout):
    checkout.parents[1].chmod(0o777 | stat.S_ISVTX)  # like /tmp: others add entries but cannot replace ours
    assert dp.data_file(dp.KNOWNS) == checkout / dp.KNOWNS
    assert dp.data_file("counterfact/missing.json") == checkout / "counterfact/missing.json"  # the caller reports it


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_another_users_file_or_link_is_refused(checkout, tmp_path):
    planted = checkout / dp.KNOWNS
    os.chown(planted, 65534, 65534)
    with pytest.raises(DatasetError, match="belongs to another user"):
        dp.data_file(dp.KNOWNS)
    os.chown(planted, 0, 0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chown(elsewhere, 65534, 65534)
    (elsewhere / "zsre.json").write_text("[]")
    (checkout / "zsre").mkdir()
    (checkout / dp.ZSRE).symlink_to(elsewhere / "zsre.json")  # ours, but it leads into another user's folder
    with pytest.raises(DatasetError, match="elsewhere belongs to another user"):
        dp.data_file(dp.ZSRE)


def test_the_normal_layout_is_accepted(shared_data, monkeypatch):
    """The shared data folder of this machine (read-only, root's) passes the check."""
    if not (shared_data / dp.KNOWNS).is_file():
        pytest.skip(f"no shared data folder at {shared_data}")
    monkeypatch.setattr(dp, "checkout_data_dir", lambda: shared_data)
    monkeypatch.delenv(dp.DATA_ENV, raising=False)
    for name in (dp.KNOWNS, dp.WIKIPEDIA, dp.COUNTERFACT, dp.COUNTERFACT_10K, dp.ZSRE):
        assert dp.data_file(name).is_file()


def test_every_default_goes_through_data_file(checkout, tmp_path, monkeypatch, capsys):
    """records, the knowns command, the corpus and the evaluation's TF-IDF text find their default
    files in $FACTSCOPE_DATA, and refuse a planted fallback."""
    from tracer.commands import knowns
    from tracer.evaluate.records import default_path
    from tracer.stats import default_corpus

    mine = tmp_path / "mine"
    monkeypatch.setenv(dp.DATA_ENV, str(mine))
    assert default_path("zsre") == mine / dp.ZSRE
    assert default_corpus() == mine / dp.WIKIPEDIA
    monkeypatch.setenv("FACTSCOPE_CORPUS", str(tmp_path / "c.txt"))
    assert default_corpus() == tmp_path / "c.txt"
    monkeypatch.delenv("FACTSCOPE_CORPUS")
    monkeypatch.delenv(dp.DATA_ENV)
    checkout.chmod(0o777)  # someone could have planted the files
    for default in (lambda: default_path("counterfact"), default_corpus):
        with pytest.raises(DatasetError, match="writable by others"):
            default()
    from tracer.cli import main

    assert main(["knowns", "--out", str(tmp_path / "k.json"), "--model", "no-model-is-loaded"]) == 2
    assert "writable by others" in capsys.readouterr().err
    checkout.chmod(0o755)
    # the knowns command reads the default file before it loads any model
    (checkout / dp.KNOWNS).write_text("not json")
    assert main(["knowns", "--out", str(tmp_path / "k.json"), "--model", "no-model-is-loaded"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert knowns.register  # the module imports without computing a path


def test_evaluation_tfidf_text_comes_from_data_file(checkout, tmp_path, monkeypatch):
    from conftest import make_tiny_model

    import tracer.evaluate.harness as harness

    seen = []

    class Stop(Exception):
        pass

    def cached(path, cache):
        seen.append(Path(path))
        raise Stop

    monkeypatch.setattr(harness.Tfidf, "cached", staticmethod(cached))
    monkeypatch.setenv(dp.DATA_ENV, str(tmp_path / "mine"))
    case = {"case_id": 0, "requested_rewrite": {"subject": "Paris", "prompt": "{} is in", "relation_id": "P17",
                                                "target_new": {"str": "Italy"}, "target_true": {"str": "France"}},
            "paraphrase_prompts": ["Paris is in"], "neighborhood_prompts": ["Lyon is in"],
            "attribute_prompts": ["Rome is in"], "generation_prompts": ["Paris is"]}
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([case]))
    with pytest.raises(Stop):
        harness.run_evaluation(make_tiny_model("gpt2", n_layers=2), "none", "counterfact", tmp_path / "out",
                               data_path=data, limit=1, progress=False)
    assert seen == [tmp_path / "mine" / dp.WIKIPEDIA]
