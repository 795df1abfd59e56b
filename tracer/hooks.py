"""The one hook primitive of factscope: :func:`hooked`, a context manager.

Every forward hook and forward replacement in the package is installed through it, and all of
them are removed when the ``with`` block ends, also when it ends with an exception::

    with hooked(model, outputs={"model.layers.3": lambda h: h * 0}) as rec:
        model(ids)                     # layer 3 outputs zeros inside the block, never after

Callbacks see the module's *main* tensor (the first element when a module returns a tuple) and
may return a replacement of the same shape, or ``None`` to keep it; a replacement is moved to the
device of the tensor it replaces (on a dispatched model each layer may live on its own device).

Models dispatched by accelerate (``load_model(device_map=...)``) already carry an instance
``forward`` on many modules (accelerate's :class:`~accelerate.hooks.AlignDevicesHook` wrapper).
A ``replace`` shadows it for the block and puts it back afterwards, so a replaced module neither
runs nor loads its offloaded weights; output and input hooks run outside accelerate's wrapper.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .layers import get_module

TensorFn = Callable[[torch.Tensor], "torch.Tensor | None"]

#: attribute marking the hooks and replacement forwards :func:`hooked` installs
_MARK = "_factscope_hook"


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
    swapped: list[tuple[torch.nn.Module, Any]] = []  # (module, the instance forward it had, or None)
    try:
        for name, fn in outputs.items():
            handles.append(modules[name].register_forward_hook(_output_hook(fn)))
        for name, fn in inputs.items():
            handles.append(modules[name].register_forward_pre_hook(_input_hook(fn)))
        for name, fn in replace.items():
            module = modules[name]
            swapped.append((module, module.__dict__.get("forward")))
            module.forward = _marked(fn)  # an instance attribute shadows the class method
        yield
    finally:
        for h in handles:
            h.remove()
        for module, previous in reversed(swapped):
            if previous is None:
                del module.forward  # back to the class method
            else:
                module.forward = previous  # e.g. accelerate's wrapper: never delete what we did not install


def _marked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind a function of ours that carries the mark :func:`active_hook_count` counts."""
    def marked(*args, **kwargs):
        return fn(*args, **kwargs)

    setattr(marked, _MARK, True)
    return marked


def _output_hook(fn: TensorFn):
    def hook(module, args, output):
        old = main_tensor(output)
        new = fn(old)
        return None if new is None else with_main_tensor(output, _like(new, old))

    setattr(hook, _MARK, True)
    return hook


def _input_hook(fn: TensorFn):
    def hook(module, args):
        new = fn(args[0])
        return None if new is None else (_like(new, args[0]),) + tuple(args[1:])

    setattr(hook, _MARK, True)
    return hook


def _like(new: Any, old: Any) -> Any:
    """``new`` on ``old``'s device when both are tensors (a restored state may come from another layer's device)."""
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.device != old.device:
        return new.to(old.device)
    return new


def record_outputs(names: list[str]) -> tuple[dict[str, TensorFn], dict[str, torch.Tensor]]:
    """Callbacks for :func:`hooked` that store each module's main output, and the dict they fill."""
    store: dict[str, torch.Tensor] = {}

    def make(name: str) -> TensorFn:
        def fn(h: torch.Tensor) -> None:
            store[name] = h.detach()

        return fn

    return {name: make(name) for name in names}, store


def active_hook_count(model: torch.nn.Module) -> int:
    """Number of forward hooks and replaced forwards :func:`hooked` has on ``model`` now (0 outside
    ``hooked``); hooks of others, such as accelerate's forward wrappers, do not count."""
    n = 0
    for m in model.modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), m.__dict__.get("forward")]
        n += sum(bool(getattr(h, _MARK, False)) for h in hooks)
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
