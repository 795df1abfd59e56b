"""The one hook primitive of factscope: :func:`hooked`, a context manager.

Every forward hook and forward replacement in the package is installed through it, and all of
them are removed when the ``with`` block ends, also when it ends with an exception::

    with hooked(model, outputs={"model.layers.3": lambda h: h * 0}) as rec:
        model(ids)                     # layer 3 outputs zeros inside the block, never after

Callbacks see the module's *main* tensor (the first element when a module returns a tuple) and
may return a replacement of the same shape, or ``None`` to keep it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .layers import get_module

TensorFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def main_tensor(x: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (first element of a tuple output)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def with_main_tensor(x: Any, h: torch.Tensor) -> Any:
    """``x`` with its main tensor replaced by ``h``, keeping tuple structure."""
    if isinstance(x, tuple):
        return (h,) + tuple(x[1:])
    if isinstance(x, list):
        return [h] + list(x[1:])
    return h


@contextmanager
def hooked(
    model: torch.nn.Module,
    *,
    outputs: dict[str, TensorFn] | None = None,
    inputs: dict[str, TensorFn] | None = None,
    replace: dict[str, Callable[..., Any]] | None = None,
) -> Iterator[None]:
    """Install hooks for the duration of a ``with`` block.

    - ``outputs[name](h)``: called with the module's main output; may return a replacement.
    - ``inputs[name](x)``: called with the module's first positional input; may return a
      replacement (used to read the keys of an MLP output projection).
    - ``replace[name](*args, **kwargs)``: runs *instead of* the module's forward (used to skip
      blocks whose outputs are already known); returns the module output.

    All names are checked before anything is installed (:class:`UnknownLayerError` with
    suggestions); everything installed is removed on exit.
    """
    outputs, inputs, replace = outputs or {}, inputs or {}, replace or {}
    modules = {name: get_module(model, name) for name in {*outputs, *inputs, *replace}}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    swapped: list[torch.nn.Module] = []
    try:
        for name, fn in outputs.items():
            handles.append(modules[name].register_forward_hook(_output_hook(fn)))
        for name, fn in inputs.items():
            handles.append(modules[name].register_forward_pre_hook(_input_hook(fn)))
        for name, fn in replace.items():
            module = modules[name]
            module.forward = fn  # instance attribute shadows the class method
            swapped.append(module)
        yield
    finally:
        for h in handles:
            h.remove()
        for module in swapped:
            del module.forward


def _output_hook(fn: TensorFn):
    def hook(module, args, output):
        new = fn(main_tensor(output))
        return None if new is None else with_main_tensor(output, new)

    return hook


def _input_hook(fn: TensorFn):
    def hook(module, args):
        new = fn(args[0])
        return None if new is None else (new,) + tuple(args[1:])

    return hook


def record_outputs(names: list[str]) -> tuple[dict[str, TensorFn], dict[str, torch.Tensor]]:
    """Callbacks for :func:`hooked` that store each module's main output, and the dict they fill."""
    store: dict[str, torch.Tensor] = {}

    def make(name: str) -> TensorFn:
        def fn(h: torch.Tensor) -> None:
            store[name] = h.detach()

        return fn

    return {name: make(name) for name in names}, store


def active_hook_count(model: torch.nn.Module) -> int:
    """Number of forward hooks and replaced forwards currently on ``model`` (0 outside ``hooked``)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
    return n


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early (:func:`run_until`)."""


def run_until(
    model: torch.nn.Module,
    forward: Callable[[], Any],
    stop_after: str,
    *,
    outputs: dict[str, TensorFn] | None = None,
    inputs: dict[str, TensorFn] | None = None,
) -> None:
    """Call ``forward()`` with ``outputs``/``inputs`` hooks installed and abandon it once module
    ``stop_after`` has run (after its own ``outputs`` callback, if any): what is read below the
    deepest layer of interest costs no pass through the layers above it."""
    outputs = dict(outputs or {})
    inner = outputs.get(stop_after)

    def stop(h: torch.Tensor) -> None:
        if inner is not None:
            inner(h)
        raise _StopForward

    outputs[stop_after] = stop
    try:
        with hooked(model, outputs=outputs, inputs=inputs):
            forward()
    except _StopForward:
        pass
