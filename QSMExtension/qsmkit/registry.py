"""Methods registered by name, per stage, so the CLI and the Slicer panels list the same choices."""

from __future__ import annotations

import inspect
import math
import re
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

    def parameters(self) -> list[Parameter]:
        """The parameters a user may set (``--param KEY=VALUE``), read from the function itself:
        names and defaults from its signature (the data the stage passes in left out), meanings
        from its numpy-style docstring; ``**params`` when it takes more than it names."""
        return method_parameters(self.func)


@dataclass(frozen=True)
class Parameter:
    name: str
    default: object
    meaning: str


#: keywords a stage or command passes to a method itself (images, geometry, echo times, field
#: strength, callbacks, output switches): not user parameters. One set, one meaning: they are
#: neither listed by ``qsmkit methods`` / ``--list-params`` nor accepted by any ``--*-param``.
DATA_ARGUMENTS = frozenset({
    "field", "mask", "voxel_size", "b0_dir", "magnitude", "weights", "noise_weights", "phase",
    "phase2", "channels", "body", "body_phase", "te", "b0", "unwrap", "return_sensitivities",
    "return_info"})


def method_parameters(func) -> list[Parameter]:
    """See :meth:`Method.parameters`."""
    doc = inspect.getdoc(func) or ""
    described = _docstring_parameters(doc)
    out = []
    for p in inspect.signature(func).parameters.values():
        if p.kind is p.VAR_POSITIONAL or (p.kind is p.VAR_KEYWORD and p.name.startswith("_")):
            continue
        if p.kind is p.VAR_KEYWORD:
            out.append(Parameter(f"**{p.name}", None, described.get(f"**{p.name}", "")))
            continue
        if p.name in DATA_ARGUMENTS or p.default is p.empty:
            continue
        out.append(Parameter(p.name, p.default, described.get(p.name) or _mentioned(doc, p.name)))
    return out


_ENTRY = re.compile(r"^(?P<names>\**\w+(?:\s*,\s*\**\w+)*)\s*:\s*(?P<text>.*)$")


def _docstring_parameters(doc: str) -> dict[str, str]:
    """name -> meaning from the ``Parameters`` section of a numpy-style docstring."""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines[:-1])
                     if line.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"})
    except StopIteration:
        return {}
    out, current = {}, None
    for line in lines[start + 2:]:
        if not line.strip():
            current = None
            continue
        if not line.startswith(" "):
            m = _ENTRY.match(line.strip())
            if m is None:  # the next section ("Returns") or prose
                if line.strip().startswith("---"):
                    break
                current = None
                continue
            current = [n.strip() for n in m.group("names").split(",")]
            for n in current:
                out[n] = m.group("text").strip()
        elif current:
            for n in current:
                out[n] = (out[n] + " " + line.strip()).strip()
    return out


def _mentioned(doc: str, name: str) -> str:
    """Where the docstring names ````name```` outside its own entry: a sentence of the prose
    before the sections, else another parameter's entry (prose-documented methods)."""
    prose = re.split(r"\n\s*(?:Parameters|Returns)\s*\n\s*-{3,}", doc)[0]
    flat = " ".join(prose.split())
    for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z`(])", flat):
        if f"``{name}``" in sentence:
            return sentence
    for other, text in _docstring_parameters(doc).items():
        if f"``{name}``" in text:
            return f"{other}: {text}"
    return ""


#: the type of parameters whose default is None, by name (``number`` or ``numbers``)
NONE_DEFAULT_TYPES = {
    "threshold": "number", "radii_mm": "numbers", "noise_sigma": "number",
    "block_mm": "number", "te_ratio": "number", "noise_sd_ppm": "number",
    "lcurve_alphas": "numbers", "te": "numbers", "noise": "number"}
#: words a numeric parameter also takes, by name (the method chooses the number itself)
NUMBER_WORDS = {"lam": ("lcurve",), "alpha": ("auto", "lcurve"), "noise": ("auto",),
                "edge_fraction": ("voxel", "size", "noise")}


def _kind(default, name):
    if default is None or default is inspect.Parameter.empty:
        return NONE_DEFAULT_TYPES.get(name, "any")
    if isinstance(default, str) and default.lower() in NUMBER_WORDS.get(name, ()):
        return "number"  # a numeric parameter whose default is one of its words (tv's alpha="auto")
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "text"
    if isinstance(default, (tuple, list)):
        return "numbers"
    return "any"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(kind, value, words=()):
    """The value converted to ``kind``, or None when it does not fit."""
    if isinstance(value, str) and value.lower() in words:
        return value.lower()
    if _is_number(value) and not math.isfinite(value):
        return None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "integer":
        return int(value) if _is_number(value) and float(value).is_integer() else None
    if kind == "number":
        return float(value) if _is_number(value) else None
    if kind == "text":
        return value if isinstance(value, str) else None
    if kind == "numbers":
        items = value if isinstance(value, list) else [value]
        if items and all(_is_number(v) and math.isfinite(v) for v in items):
            return [float(v) for v in items]
        return None
    if isinstance(value, list) and any(_is_number(v) and not math.isfinite(v) for v in value):
        return None
    return value


_KIND_TEXT = {"bool": "true or false", "integer": "an integer", "number": "a finite number",
              "text": "text", "numbers": "a number or comma-separated numbers",
              "any": "a finite value"}


def validate_params(func, params: dict, option: str, what: str) -> dict:
    """``params`` (from ``KEY=VALUE`` options) checked against ``func``'s keywords: each key must
    be a keyword of ``func`` (unless it takes ``**kwargs`` that it passes on), not one the
    pipeline sets itself, and each value must fit the type of its default (an int default
    takes integers, a float default numbers, a bool default true/false, a str default text;
    None defaults by ``NONE_DEFAULT_TYPES``); NaN and Inf are refused everywhere.
    Returns the converted values; raises a one-line :class:`QSMInputError` naming ``option``."""
    sig = inspect.signature(func)
    accepted = {n: p for n, p in sig.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_kwargs = any(p.kind == p.VAR_KEYWORD and not p.name.startswith("_")
                      for p in sig.parameters.values())
    settable = sorted(n for n, p in accepted.items()
                      if n not in DATA_ARGUMENTS and p.default is not inspect.Parameter.empty)
    out = {}
    for key, value in (params or {}).items():
        if key in DATA_ARGUMENTS or (key in accepted and
                                      accepted[key].default is inspect.Parameter.empty):
            raise QSMInputError(f"{option} {key}: set by qsmkit itself, not a parameter of {what}")
        if key not in accepted and not open_kwargs:
            raise QSMInputError(f"{option} {key}: unknown parameter of {what}; known: "
                                f"{', '.join(settable) or 'none'}")
        kind = _kind(accepted[key].default, key) if key in accepted else "any"
        words = NUMBER_WORDS.get(key, ())
        checked = _check_value(kind, value, words)
        if checked is None:
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            also = f" or {' or '.join(words)}" if words else ""
            raise QSMInputError(f"{option} {key}={shown}: {what} expects "
                                f"{_KIND_TEXT[kind]}{also}")
        out[key] = checked
    return out


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

    def validate_params(self, name: str, params: dict, option: str = "--param") -> dict:
        """``params`` checked against method ``name``'s keywords (``validate_params``)."""
        name = self.resolve(name)
        return validate_params(self._methods[name].func, params, option,
                               f"{self.stage} method {name!r}")
