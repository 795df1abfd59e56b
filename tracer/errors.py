"""The exceptions factscope raises for bad input.

Every message says what was wrong and what is accepted, so the CLI can print it on one line.
All derive from :class:`FactscopeError`, which derives from :class:`ValueError`.
"""
from __future__ import annotations

import difflib


class FactscopeError(ValueError):
    """Base class of every error factscope raises for bad input or missing files."""


class ModelNotFoundError(FactscopeError):
    """A model name, directory or GGUF file could not be loaded."""


class UnsupportedArchitectureError(FactscopeError):
    """The model's family has no :class:`~tracer.layers.LayerMap` and none was passed."""


class UnknownLayerError(FactscopeError):
    """A module name does not exist in the model."""

    @classmethod
    def for_name(cls, name: str, available: list[str]) -> "UnknownLayerError":
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return cls(f"no module named {name!r} in the model{hint}")


class SubjectNotFoundError(FactscopeError):
    """The subject string does not occur in the prompt."""


class PromptError(FactscopeError):
    """The prompt is empty, too long for the model, or otherwise unusable."""


class HyperParameterError(FactscopeError):
    """A setting is out of its accepted range."""


class JobTooLargeError(HyperParameterError):
    """A job needs more memory (or more work) than this machine allows; refused before it starts."""


class EditError(FactscopeError):
    """An edit request or ledger operation is invalid; the model was left unchanged."""


class StatisticsError(FactscopeError):
    """Key statistics are missing, corrupted or do not match the model."""


class DatasetError(FactscopeError):
    """A facts file or a dataset-trace directory is malformed or belongs to a different run."""


class WorkerError(FactscopeError):
    """Ray workers could not start (Ray missing, too few CPUs or GPUs) or were all lost."""


class Cancelled(FactscopeError):
    """Long work was stopped by its user (:func:`tracer.progress.watching`); nothing was changed."""
