"""Precision and placement settings of :func:`tracer.models.load_model`, checked before any load.

    resolve_dtype("bfloat16")                       # torch.bfloat16; names in DTYPES
    parse_max_memory("cpu=2GiB,cuda:0=70GiB")       # {"cpu": 2147483648, 0: 75161927680}
    placement_arguments(None, "auto", "cpu=2GiB", "offload")   # from_pretrained's keyword arguments

transformers and accelerate do the placement; this module only checks what the user asked for
(one-line :class:`HyperParameterError` naming what is accepted) and reads a dispatched model:
:func:`module_device` (where a module computes) and :func:`named_weights` (every weight,
offloaded ones read from accelerate's store).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Union

import torch
from accelerate.utils import align_module_device, has_offloaded_params

from .errors import HyperParameterError
from .limits import parse_size

#: weight dtypes :func:`tracer.models.load_model` accepts, by name (float32 is the default)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: placement strategies transformers/accelerate compute a device map with (``device_map=``)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
#: a ``device_map`` value or ``max_memory`` key: an accelerator index, ``"cpu"``, ``"disk"`` or ``"mps"``
DeviceKey = Union[int, str]
#: what a device map may be: a strategy name or ``{module name: device}``
DeviceMap = Union[str, Mapping[str, Union[DeviceKey, torch.device]]]


def resolve_dtype(dtype: "torch.dtype | str | None") -> torch.dtype:
    """``None`` (float32), a name in :data:`DTYPES` or one of its ``torch.dtype`` values."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise HyperParameterError(f"dtype {dtype!r} is not accepted; pass one of {', '.join(DTYPES)}")


def parse_max_memory(spec: "str | Mapping[DeviceKey, int | str]") -> dict[DeviceKey, int]:
    """``"cpu=2GiB,cuda:0=70GiB"`` (or a dict) -> ``{"cpu": 2147483648, 0: 75161927680}``.

    Keys: ``cpu``, ``disk``, ``mps``, ``cuda:N`` or ``N`` (an accelerator that exists);
    sizes: bytes or a number with kB, MB, GB, TB, KiB, MiB, GiB or TiB.
    """
    accepted = "DEVICE=SIZE pairs separated by commas, e.g. cpu=2GiB,cuda:0=70GiB (devices: cpu, disk, mps, cuda:N)"
    if isinstance(spec, str):
        pairs = []
        for part in (p.strip() for p in spec.split(",")):
            key, sep, size = part.partition("=")
            if not sep or not key.strip() or not size.strip():
                raise HyperParameterError(f"max memory {spec!r} is not understood at {part!r}; pass {accepted}")
            pairs.append((key.strip(), size.strip()))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        raise HyperParameterError(f"max memory must be a string or a dict, got {type(spec).__name__}; pass {accepted}")
    if not pairs:
        raise HyperParameterError(f"max memory is empty; pass {accepted}")
    out: dict[DeviceKey, int] = {}
    for key, size in pairs:
        device = _device_key(key, accepted)
        if device in out:
            raise HyperParameterError(f"max memory names {key!r} twice; pass {accepted}")
        out[device] = parse_size(size, f"max memory {key}={size!r}")
    return out


def _device_key(key: DeviceKey, accepted: str) -> DeviceKey:
    """A ``max_memory`` key in accelerate's form: an accelerator index or ``cpu``/``disk``/``mps``."""
    text = str(key).strip().lower()
    if text in ("cpu", "disk", "mps"):
        return text
    index = text.removeprefix("cuda:").removeprefix("cuda") if text.startswith("cuda") else text
    if isinstance(key, bool) or not index.isdigit():
        raise HyperParameterError(f"max memory device {key!r} is not understood; pass {accepted}")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise HyperParameterError(f"max memory names cuda:{index}, but this machine has {count} CUDA device(s); pass {accepted}")
    return int(index)


def placement_arguments(device, device_map, max_memory, offload_folder) -> dict:
    """``from_pretrained``'s placement arguments (``device_map``, ``max_memory``,
    ``offload_folder``), or ``{"device": torch.device}`` for one device; every setting checked."""
    if device_map is None:
        given = [what for what, value in (("max memory", max_memory), ("an offload folder", offload_folder)) if value is not None]
        if given:
            raise HyperParameterError(f"{' and '.join(given)} go(es) with a device map; also pass device_map='auto' "
                                      f"(--device-map auto) or another of {', '.join(DEVICE_MAPS)}")
        return {"device": resolve_device(device)}
    if device is not None:
        raise HyperParameterError(f"pass a device ({device!r}) or a device map ({device_map!r}), not both")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise HyperParameterError(f"device map {device_map!r} is not accepted; pass one of {', '.join(DEVICE_MAPS)} "
                                      "or a dict {module name: device}")
    elif not isinstance(device_map, Mapping) or not device_map or not all(isinstance(k, str) for k in device_map):
        raise HyperParameterError(f"device map must be one of {', '.join(DEVICE_MAPS)} or a non-empty dict "
                                  "{module name: device}")
    placement: dict = {"device_map": device_map if isinstance(device_map, str) else dict(device_map)}
    if max_memory is not None:
        placement["max_memory"] = parse_max_memory(max_memory)
    if offload_folder is not None:
        folder = Path(offload_folder)
        if folder.exists() and not folder.is_dir():
            raise HyperParameterError(f"offload folder {str(folder)!r} is a file; pass a folder (it is created if missing)")
        placement["offload_folder"] = str(folder)
    return placement


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """``device`` as a ``torch.device`` (default: CUDA when available, else the CPU), checked."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise HyperParameterError(f"device {device!r} is not understood; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HyperParameterError(f"device {str(device)!r} asked for, but this machine has no CUDA device; pass cpu")
    return device


def describe(placement: dict) -> str:
    """``device_map='auto', max_memory={...}`` for messages."""
    return ", ".join(f"{k}={v!r}" for k, v in placement.items())


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when it is dispatched (its weights
    may wait on the CPU, on disk or on the meta device), else its first parameter's device."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter as ``(name, tensor)`` in ``named_parameters`` order (tied ones once).

    A weight accelerate offloaded (on the meta device in its module) is read from the offload
    store onto the CPU for the time the consumer holds it; others are yielded as they are.
    """
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.device.type != "meta":
            yield name, p.detach()
            continue
        owner = next((m for m in _ancestors(name) if has_offloaded_params(modules[m])), None)
        if owner is None:
            raise HyperParameterError(f"weight {name!r} is on the meta device and no accelerate offload hook holds it; "
                                      "load the model with load_model(device_map=...)")
        with align_module_device(modules[owner], torch.device("cpu")):
            yield name, model.get_parameter(name).detach().clone()


def _ancestors(name: str) -> list[str]:
    """Module names that own parameter ``name``, innermost first: ``"a.b.w"`` -> ``["a.b", "a", ""]``."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


