"""Sub-commands of the ``factscope`` CLI; see :mod:`tracer.cli`.

Every command that loads a model takes the same model options, defined once here
(:func:`add_model_arguments`) and passed to :func:`tracer.models.load_model` by
:func:`load_model_from_args`.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import FactscopeError, HyperParameterError
from ..limits import check_count
from ..models import EMBEDDED_ALIAS, LanguageModel, load_model
from ..placement import DEVICE_MAPS, DTYPES
from ..spread import LocalRunner, RayPool, Runner


def check_output_path(path: Path | None, what: str = "output file") -> Path | None:
    """Fail before any work when ``path``'s folder does not exist or ``path`` is a folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise FactscopeError(f"{what} {str(path)!r} is a directory; pass a file name")
    if not path.parent.exists():
        raise FactscopeError(f"folder {str(path.parent)!r} for the {what} does not exist; create it first")
    return path


def parse_layers(text: str) -> tuple[int, ...]:
    """``--layers`` of evaluate and plan: ``2-6`` or ``2,3,4`` as a tuple of layers."""
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            return tuple(range(int(a), int(b) + 1))
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise HyperParameterError(f"--layers must look like 2-6 or 2,3,4; got {text!r}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and how to load it: ``--device``, ``--dtype``, ``--device-map``,
    ``--max-memory``, ``--offload-folder`` (transformers and accelerate do the placement)."""
    g = parser.add_argument_group("model", "which model, in which precision, on which devices")
    g.add_argument("--model", default=EMBEDDED_ALIAS,
                   help=f"model alias, Hugging Face id, directory or .gguf (default {EMBEDDED_ALIAS})")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N for the whole model (default: cuda when available)")
    g.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="the weights' dtype (default float32); scores, noise and key statistics are computed "
                        "in float32 or float64 whatever it is")
    g.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                   help="instead of --device: let accelerate spread the layers over the GPUs, the CPU and "
                        "--offload-folder")
    g.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                   help="with --device-map: the most each device may hold, e.g. cpu=2GiB,cuda:0=70GiB")
    g.add_argument("--offload-folder", type=Path, default=None, metavar="DIR",
                   help="with --device-map: where layers that fit on no device are offloaded")


def load_model_from_args(args: argparse.Namespace) -> LanguageModel:
    """:func:`tracer.models.load_model` with the options of :func:`add_model_arguments`."""
    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      max_memory=args.max_memory, offload_folder=args.offload_folder)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray``, ``--ray-address``, ``--workers``: the one way a command spreads its work."""
    group = parser.add_argument_group("spreading the work over Ray workers (one model each; this process writes the files)")
    group.add_argument("--ray", action="store_true",
                       help="spread the work over Ray workers: a local Ray cluster, or the one at --ray-address")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join the running Ray cluster at ADDR (HOST:6379, or auto) instead of starting one here")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="Ray workers (default: one per GPU of the cluster, else one per free CPU)")


def check_ray_arguments(args: argparse.Namespace) -> None:
    """Refuse ``--ray-address`` / ``--workers`` without ``--ray`` and a bad worker count (before any work)."""
    if (args.ray_address is not None or args.workers is not None) and not args.ray:
        raise HyperParameterError("--ray-address and --workers spread the work over Ray workers; add --ray")
    if args.workers is not None:
        check_count("--workers", args.workers, (1, 4096))


@contextmanager
def model_runner(args: argparse.Namespace) -> Iterator[Runner]:
    """The model of ``--model`` / ``--device`` in this process, or with ``--ray`` a pool of Ray workers."""
    if args.ray:
        options = {"dtype": args.dtype, "device_map": args.device_map, "max_memory": args.max_memory,
                   "offload_folder": args.offload_folder}
        with RayPool(args.model, workers=args.workers, address=args.ray_address, device=args.device,
                     load_options=options) as pool:
            yield pool
    else:
        yield LocalRunner(load_model_from_args(args))
