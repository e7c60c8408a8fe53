"""Methods registered by name, per stage, so the CLI and the Slicer panels list the same choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import QSMInputError


@dataclass(frozen=True)
class Method:
    name: str
    func: Callable
    summary: str


class Registry:
    """A stage's methods. ``auto`` resolves through ``default`` (a name or a callable returning one)."""

    def __init__(self, stage: str, default):
        self.stage = stage
        self._default = default
        self._methods: dict[str, Method] = {}

    def register(self, name: str, summary: str = ""):
        def decorate(func):
            self._methods[name] = Method(name, func, summary or (func.__doc__ or "").split("\n")[0])
            return func

        return decorate

    def names(self) -> list[str]:
        return list(self._methods)

    def choices(self) -> list[str]:
        return ["auto", *self._methods]

    def resolve(self, name: str | None) -> str:
        name = (name or "auto").lower()
        if name == "auto":
            name = self._default() if callable(self._default) else self._default
        if name not in self._methods:
            raise QSMInputError(
                f"unknown {self.stage} method {name!r}; choose one of {', '.join(self.choices())}"
            )
        return name

    def get(self, name: str | None) -> Method:
        return self._methods[self.resolve(name)]
