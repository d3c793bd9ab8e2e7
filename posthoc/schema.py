"""Declared shapes of the JSON posthoc reads (an artifact's ``config.json``, a timm ``config.json``): every
field's type and range, checked in one pass with a one-line error naming the field.

A spec is built from a few pieces: :class:`Integer`, :class:`Number` (finite, with bounds),
:class:`Text`, :class:`Flag`, :class:`OneOf`, :class:`ListOf`, :class:`Record` (a JSON object with
required and optional fields), :class:`MapOf`, :class:`Maybe` (``null`` allowed) and :class:`Either`.
:func:`check` walks a value against a spec and raises :class:`~posthoc.errors.PosthocError` with the
file, the dotted name of the first field that does not fit, what it must be, and what it holds, e.g.
``art/config.json: field combine.temperature must be a number more than 0, got "hot"``.

Configs are data, not instructions: nothing in a spec calls code named by the config.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from .errors import PosthocError


class Invalid(Exception):
    """A field that does not fit its spec (turned into one :class:`PosthocError` line by :func:`check`)."""

    def __init__(self, name: str, what: str, value: Any):
        super().__init__(name)
        self.name, self.what, self.value = name, what, value


class Spec:
    """The shape of one JSON value: :meth:`check` returns it, or raises :class:`Invalid`."""

    what = "a value"

    def check(self, value: Any, name: str) -> Any:
        """``value`` (the field ``name``) when it fits, else :class:`Invalid`; subclasses check their shape."""
        return value

    def fail(self, value: Any, name: str, what: str | None = None) -> None:
        """Raise :class:`Invalid`: the field ``name`` must be ``what`` (default: this spec's description)."""
        raise Invalid(name, what or self.what, value)


class Anything(Spec):
    """Any JSON value (non-finite numbers are refused when the file is read)."""


class Flag(Spec):
    """``true`` or ``false`` (not 0 or 1)."""

    what = "true or false"

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, bool):
            self.fail(value, name)
        return value


def _bounds_text(ge, gt, le, lt) -> str:
    parts = [
        f"{word} {b:g}" for b, word in ((ge, "at least"), (gt, "more than"), (le, "at most"), (lt, "less than")) if b is not None
    ]
    return " and ".join(parts)


class Number(Spec):
    """A finite number (an integer counts), optionally bounded."""

    def __init__(self, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None):
        self.bounds = (ge, gt, le, lt)
        bounds = _bounds_text(ge, gt, le, lt)
        self.what = "a finite number" + (f" {bounds}" if bounds else "")

    def check(self, value: Any, name: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(value, name)
        ge, gt, le, lt = self.bounds
        if (ge is not None and value < ge) or (gt is not None and value <= gt):
            self.fail(value, name)
        if (le is not None and value > le) or (lt is not None and value >= lt):
            self.fail(value, name)
        return value


class Integer(Number):
    """A whole number, optionally bounded."""

    def __init__(self, ge: int | None = None, le: int | None = None):
        super().__init__(ge=ge, le=le)
        bounds = _bounds_text(ge, None, le, None)
        self.what = "a whole number" + (f" {bounds}" if bounds else "")

    def check(self, value: Any, name: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(value, name)
        return super().check(value, name)


class Text(Spec):
    """A string, optionally matching ``pattern`` (described by ``what``) and at most ``max_len`` long."""

    def __init__(self, pattern: str | None = None, what: str = "text", max_len: int = 100_000):
        self.pattern = re.compile(pattern) if pattern else None
        self.what, self.max_len = what, max_len

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, str) or len(value) > self.max_len:
            self.fail(value, name)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            self.fail(value, name)
        return value


class OneOf(Spec):
    """One of the given values."""

    def __init__(self, *choices: Any):
        self.choices = choices
        self.what = "one of " + ", ".join(json.dumps(c) for c in choices)

    def check(self, value: Any, name: str) -> Any:
        if not any(type(value) is type(c) and value == c for c in self.choices):
            self.fail(value, name)
        return value


class Maybe(Spec):
    """``null`` or ``spec``."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.what = f"{spec.what} or null"

    def check(self, value: Any, name: str) -> Any:
        if value is None:
            return None
        try:
            return self.spec.check(value, name)
        except Invalid as e:
            if e.name == name:  # this value itself, not a field inside it: say null would do too
                raise Invalid(name, self.what, value) from None
            raise


class Either(Spec):
    """The first of ``specs`` that fits."""

    def __init__(self, *specs: Spec):
        self.specs = specs
        self.what = " or ".join(s.what for s in specs)

    def check(self, value: Any, name: str) -> Any:
        for spec in self.specs:
            try:
                return spec.check(value, name)
            except Invalid:
                continue
        self.fail(value, name)


class ListOf(Spec):
    """A list whose items fit ``item``, with ``length`` items or between ``min_len`` and ``max_len``."""

    def __init__(self, item: Spec, *, length: int | None = None, min_len: int = 0, max_len: int | None = None):
        self.item, self.length, self.min_len, self.max_len = item, length, min_len, max_len
        count = f"{length} " if length is not None else (f"at least {min_len} " if min_len else "")
        self.what = f"a list of {count}items, each {item.what}"

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, list):
            self.fail(value, name)
        n = len(value)
        if (self.length is not None and n != self.length) or n < self.min_len or (self.max_len is not None and n > self.max_len):
            self.fail(value, name)
        for i, item in enumerate(value):
            self.item.check(item, f"{name}[{i}]")
        return value


class MapOf(Spec):
    """A JSON object whose values all fit ``value``."""

    def __init__(self, value: Spec):
        self.value = value
        self.what = f"an object of {value.what}"

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, dict):
            self.fail(value, name, "an object")
        for key, item in value.items():
            self.value.check(item, f"{name}.{key}" if name else key)
        return value


class Record(Spec):
    """A JSON object: ``required`` fields, ``optional`` ones, and (``extra``) any others, unchecked."""

    what = "an object"

    def __init__(self, required: dict[str, Spec] | None = None, optional: dict[str, Spec] | None = None, extra: bool = True):
        self.required, self.optional, self.extra = dict(required or {}), dict(optional or {}), extra

    def check(self, value: Any, name: str) -> Any:
        if not isinstance(value, dict):
            self.fail(value, name)
        for key, spec in self.required.items():
            field = f"{name}.{key}" if name else key
            if key not in value:
                raise Invalid(field, f"present ({spec.what})", _MISSING)
            spec.check(value[key], field)
        for key, spec in self.optional.items():
            if key in value:
                spec.check(value[key], f"{name}.{key}" if name else key)
        if not self.extra:
            unknown = sorted(set(value) - set(self.required) - set(self.optional))
            if unknown:
                raise Invalid(
                    f"{name}.{unknown[0]}" if name else unknown[0], "absent (not a field posthoc knows)", value[unknown[0]]
                )
        return value


class Where(Spec):
    """``spec``, then ``test(value)``: a message (what is wrong) or ``None``."""

    def __init__(self, spec: Spec, test: Callable[[Any], str | None]):
        self.spec, self.test = spec, test
        self.what = spec.what

    def check(self, value: Any, name: str) -> Any:
        self.spec.check(value, name)
        problem = self.test(value)
        if problem:
            raise Invalid(name, problem, value)
        return value


_MISSING = object()


def shown(value: Any, limit: int = 60) -> str:
    """A short JSON rendering of ``value`` for an error line."""
    if value is _MISSING:
        return "nothing"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check(value: Any, spec: Spec, source: str, name: str = "") -> Any:
    """``value`` checked against ``spec``; a one-line :class:`PosthocError` names ``source`` and the field."""
    try:
        return spec.check(value, name)
    except Invalid as e:
        field = f"field {e.name}" if e.name else "its content"
        raise PosthocError(f"{source}: {field} must be {e.what}, got {shown(e.value)}; fix or regenerate it") from None


def unique(items: Iterable[Any]) -> str | None:
    """For :class:`Where`: a message when ``items`` repeat."""
    items = list(items)
    return "without repeats" if len({json.dumps(i, sort_keys=True) for i in items}) != len(items) else None
