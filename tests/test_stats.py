"""Key statistics: exact second moment, cache keyed and verified, identity labelled."""
from __future__ import annotations

import logging

import pytest
import torch

from tracer.errors import StatisticsError
from tracer.hooks import hooked
from tracer.stats import Corpus, KeyStatistics, StatsCache, compute_key_statistics, key_fingerprint

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. " * 3,
    "Rome is the capital city of Italy and a special comune. It is the country's most populated comune. " * 3,
    "The Louvre is the world's most-visited museum, and a historic landmark in Paris. " * 3,
]


def _d_k(lm, layer):
    w = lm.model.get_submodule(lm.layers.mlp_out_name(layer)).weight
    return w.shape[0] if lm.layers.mlp_out_transposed else w.shape[1]


def test_second_moment_matches_direct_computation(tiny_lm):
    lm, layer = tiny_lm, 1
    d_k = _d_k(lm, layer)
    n = d_k + 37
    stats = compute_key_statistics(lm, layer, n, TEXTS, corpus_name="three", chunk_tokens=64, progress=False)
    # direct: every key of the same chunks, summed in float64
    keys = []
    seen = 0
    for text in TEXTS:
        ids = lm.tokenizer(text)["input_ids"]
        for s in range(0, len(ids), 64):
            piece = ids[s:s + 64][: n - seen]
            if len(piece) < 2 or seen >= n:
                continue
            with hooked(lm.model, inputs={lm.layers.mlp_out_name(layer): lambda x: keys.append(x[0].double())}):
                lm.model(input_ids=torch.tensor([piece]))
            seen += len(piece)
    k = torch.cat(keys)
    assert k.shape == (n, d_k)
    expected = k.T @ k / n
    assert stats.n_tokens == n and stats.kind == "second_moment"
    assert stats.mom2.dtype == torch.float64 and stats.mom2.shape == (d_k, d_k)
    assert torch.allclose(stats.mom2, expected, rtol=1e-9, atol=1e-12)
    # C⁻¹ k solves C x = k
    probe = k[3].float()
    x = stats.solve(probe)
    assert torch.allclose(stats.mom2 @ x, probe.double(), rtol=1e-6, atol=1e-8)


def test_cache_writes_once_and_reloads_identical(tiny_lm, tmp_path):
    lm = tiny_lm
    n = _d_k(lm, 1) + 10
    cache = StatsCache(tmp_path)
    first = cache.get(lm, 1, n, TEXTS, corpus_name="three", chunk_tokens=64, progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*.tmp"))
    mtime = files[0].stat().st_mtime_ns
    second = cache.get(lm, 1, n, TEXTS, corpus_name="three", chunk_tokens=64, progress=False)
    assert files[0].stat().st_mtime_ns == mtime
    assert torch.equal(first.mom2, second.mom2)
    assert second.to_dict() == first.to_dict()
    # every key component gives its own file
    cache.get(lm, 1, n + 1, TEXTS, corpus_name="three", chunk_tokens=64, progress=False)
    cache.get(lm, 2, n, TEXTS, corpus_name="three", chunk_tokens=64, progress=False)
    cache.get(lm, 1, n, TEXTS, corpus_name="three", chunk_tokens=64, dtype="float32", progress=False)
    cache.get(lm, 1, n, TEXTS[:2] + [TEXTS[2] + " More."], corpus_name=None, chunk_tokens=64, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 5


@pytest.mark.parametrize("damage", ["truncate", "flip", "key"])
def test_cache_rejects_corrupted_file(damage, tmp_path, caplog):
    from conftest import make_tiny_model

    lm = make_tiny_model("gpt2")
    n = _d_k(lm, 1) + 10
    cache = StatsCache(tmp_path)
    good = cache.get(lm, 1, n, TEXTS, corpus_name="three", chunk_tokens=64, progress=False)
    path = next(tmp_path.glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-5] ^= 0xFF  # inside the matrix: the checksum no longer matches
    else:  # a file written for another key, renamed into place
        other = cache.path_for({**good.cache_key(), "n_tokens": n + 1})
        cache.get(lm, 1, n + 1, TEXTS, corpus_name="three", chunk_tokens=64, progress=False)
        data = bytearray(other.read_bytes())
    path.write_bytes(bytes(data))
    key = good.cache_key()
    with caplog.at_level(logging.WARNING, logger="tracer.stats"):
        assert cache.load(path, key) is None
        again = cache.get(lm, 1, n, TEXTS, corpus_name="three", chunk_tokens=64, progress=False)
    assert "recomputing" in caplog.text
    assert torch.equal(again.mom2, good.mom2)
    assert cache.load(path, key) is not None  # rewritten, valid again


def test_identity_is_labelled_and_solve_is_identity(tiny_lm):
    stats = KeyStatistics.identity(tiny_lm, 1)
    assert stats.is_identity and stats.mom2 is None and "C = I" in stats.label
    assert stats.to_dict()["kind"] == "identity"
    k = torch.randn(_d_k(tiny_lm, 1))
    assert torch.equal(stats.solve(k), k.double())
    with pytest.raises(StatisticsError, match="d_k"):
        stats.solve(torch.randn(3))


def test_fingerprint_ignores_the_edited_projection_only(tiny_lm):
    lm = tiny_lm
    fp = key_fingerprint(lm, 1)
    w = lm.model.get_submodule(lm.layers.mlp_out_name(1)).weight
    top = lm.model.get_submodule(lm.layers.mlp_out_name(3)).weight
    with torch.no_grad():
        w.add_(1.0)
        top.add_(1.0)
    assert key_fingerprint(lm, 1) == fp
    with torch.no_grad():
        lm.model.get_submodule(lm.layers.mlp_out_name(0)).weight.mul_(1.5)
    assert key_fingerprint(lm, 1) != fp


def test_bad_inputs_raise_statistics_error(tiny_lm, tmp_path):
    lm = tiny_lm
    d_k = _d_k(lm, 1)
    with pytest.raises(StatisticsError, match="d_k"):
        compute_key_statistics(lm, 1, d_k - 1, TEXTS, progress=False)
    with pytest.raises(StatisticsError, match="only"):
        compute_key_statistics(lm, 1, 10 * d_k + 10_000, TEXTS[:1], progress=False)
    with pytest.raises(StatisticsError, match="does not exist"):
        compute_key_statistics(lm, 1, d_k, tmp_path / "missing.jsonl", progress=False)
    with pytest.raises(StatisticsError, match="layer"):
        compute_key_statistics(lm, 99, d_k, TEXTS, progress=False)
    with pytest.raises(StatisticsError, match="dtype"):
        compute_key_statistics(lm, 1, d_k, TEXTS, dtype="float16", progress=False)
    with pytest.raises(StatisticsError):
        Corpus.from_source([])


def test_text_file_corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc line\nstill first\n\nsecond doc\n\n\nthird")
    corpus = Corpus.from_source(path)
    assert list(corpus.texts()) == ["first doc line\nstill first", "second doc", "third"]
    assert corpus.identity.startswith("c.txt:")
    path.write_text("changed")
    assert Corpus.from_source(path).identity != corpus.identity


def test_default_corpus_streams_wikipedia():
    corpus = Corpus.from_source()
    first = next(corpus.texts())
    assert corpus.identity.startswith("enwiki_2015_3220_articles.jsonl.gz:") and len(first) > 1000


def test_default_corpus_follows_environment(tmp_path, monkeypatch):
    from tracer.stats import Corpus

    text = tmp_path / "notes.txt"
    text.write_text("First document.\n\nSecond document.")
    monkeypatch.setenv("FACTSCOPE_CORPUS", str(text))
    corpus = Corpus.from_source(None)
    assert corpus.path == text and list(corpus.texts()) == ["First document.", "Second document."]
    monkeypatch.setenv("FACTSCOPE_CORPUS", str(tmp_path / "missing.jsonl.gz"))
    with pytest.raises(StatisticsError, match="FACTSCOPE_CORPUS"):
        Corpus.from_source(None)
