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
    #: optional ``check()`` that raises :class:`QSMInputError` (saying how to fix it) when the
    #: method cannot run here, e.g. an external tool that is not installed
    check: Callable | None = None


class Registry:
    """A stage's methods. ``auto`` resolves through ``default`` (a name or a callable returning one).

    Resolving a method that has a ``check`` runs it, so a method that cannot run here (an
    external tool missing) fails when the configuration is resolved, before any work.
    """

    def __init__(self, stage: str, default):
        self.stage = stage
        self._default = default
        self._methods: dict[str, Method] = {}

    def register(self, name: str, summary: str = "", check: Callable | None = None):
        def decorate(func):
            self._methods[name] = Method(name, func, summary or (func.__doc__ or "").split("\n")[0],
                                         check)
            return func

        return decorate

    @property
    def default(self):
        """What ``auto`` resolves through: a method name or a callable returning one."""
        return self._default

    def set_default(self, default) -> None:
        """Change the ``auto`` rule (a name, or a callable returning a name at resolve time)."""
        self._default = default

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
        check = self._methods[name].check
        if check is not None:
            check()
        return name

    def get(self, name: str | None) -> Method:
        return self._methods[self.resolve(name)]
