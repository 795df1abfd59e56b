"""What to write: :class:`EditRequest` (one fact, ROME) and :class:`Request` (one fact of a MEMIT batch).

    EditRequest("{} is located in the city of", "The Eiffel Tower", " Rome")   # '{}' marks the subject
    Request.coerce({"subject": ..., "prompt": ..., "target_new": ...})        # dicts, cases, requests
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import EditError, SubjectNotFoundError
from ..targets import spaced


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``prompt`` (with ``{}`` where ``subject`` goes) to continue with ``target_new``.

    A prompt without ``{}`` must contain the subject; its first occurrence becomes ``{}``.
    ``target_true`` names the old answer (default: the model's top-1 before the edit).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new"):
            if not isinstance(getattr(self, name), str):
                raise EditError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not self.subject.strip():
            raise EditError("the subject is empty; pass the words that name it, e.g. 'The Eiffel Tower'")
        if "{}" not in self.prompt:
            if self.subject not in self.prompt:
                raise SubjectNotFoundError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}; pass a prompt "
                                           "with '{}' where the subject goes, or one that contains the subject")
            object.__setattr__(self, "prompt", self.prompt.replace(self.subject, "{}", 1))
        if self.prompt.count("{}") != 1:
            raise EditError(f"the prompt must contain '{{}}' exactly once, got {self.prompt!r}")
        if not self.target_new.strip():
            raise EditError("target_new is empty; pass the new answer, e.g. ' Rome' (with its leading space)")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            raise EditError("target_true must be a non-empty string or None")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise EditError(f"target_new and target_true are both {self.target_new!r}; there is nothing to change")

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EditRequest":
        return cls(**d)

    @classmethod
    def from_counterfact(cls, record: dict) -> "EditRequest":
        """A request from a CounterFact record (ROME's format; targets get ROME's leading space)."""
        rw = record["requested_rewrite"]
        return cls(rw["prompt"], rw["subject"], spaced(rw["target_new"]["str"]), spaced(rw["target_true"]["str"]))


@dataclass(frozen=True)
class Request:
    """One fact to write: ``prompt`` has ``{}`` where ``subject`` goes; ``target_new`` is the new object."""

    subject: str
    prompt: str
    target_new: str

    @classmethod
    def coerce(cls, r: Any) -> "Request":
        """From a :class:`Request`, a dict, or any object with ``subject`` / ``prompt`` / ``target_new``
        (an ``EditRequest`` or an evaluation ``Case``)."""
        get = (lambda k: r.get(k)) if isinstance(r, dict) else (lambda k: getattr(r, k, None))
        subject, prompt, target = get("subject"), get("prompt"), get("target_new")
        if isinstance(target, dict):  # ROME's {"str": ...}
            target = target.get("str")
        if not isinstance(subject, str) or not subject.strip():
            raise EditError(f"request {r!r} has no subject")
        if not isinstance(prompt, str) or "{}" not in prompt:
            if isinstance(prompt, str) and subject in prompt:
                prompt = prompt.replace(subject, "{}", 1)
            else:
                raise EditError(f"prompt {prompt!r} must contain '{{}}' (or the subject {subject!r})")
        if not isinstance(target, str) or not target.strip():
            raise EditError(f"request for {subject!r} has an empty target_new")
        return cls(subject=subject, prompt=prompt, target_new=target)

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    def edit_request(self) -> EditRequest:
        """As an :class:`EditRequest` (target with ROME's leading space)."""
        return EditRequest(self.prompt, self.subject, spaced(self.target_new))
