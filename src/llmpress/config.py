"""One validating base for the configs: each field is checked against its annotation on construction.

A config is a frozen dataclass deriving from :class:`Config`; its annotations are the whole
specification, and nothing checks a field by hand::

    @dataclass(frozen=True)
    class AWQConfig(Config):
        label = "awq"                    # messages read "awq n_grid=0 is invalid: use an integer >= 1"
        bits: Bits = 4                   # a shared alias, Annotated[int, Check(ge=2, le=8, ...)]
        sym: bool = False
        n_grid: Annotated[int, Check(ge=1)] = 20
        max_shrink: Annotated[float, Check(gt=0, le=1, advice="use a number in (0, 1], e.g. 0.5")] = 0.5

        def check(self) -> None:         # rules between fields only, run after every field passed
            ...

What each annotation accepts (YAML and Python values alike):

* ``bool``: True or False, not 0/1 or "yes";
* ``int``: an int, not a bool; ``float``: an int or a float, not a bool, and finite (no nan, no inf);
* ``str``; ``Literal[...]``: one of the values, of the same type (True is not 1, 4.0 is not 4);
* ``X | None``: None or an X; ``tuple[X, ...]`` / ``tuple[X, Y]``: a tuple or a list (lists, as YAML
  gives them, are stored as tuples), each item an X; any other class: an instance of it.

``Annotated[X, Check(...)]`` adds bounds (``ge``, ``gt``, ``le``, ``lt``), ``choices``, a ``rule``
(a predicate, for what bounds cannot say: "positive or -1", "N:M") and the wording. A refused value
raises :class:`~llmpress.errors.LlmpressError` with one line,
``"{label} {name}={value!r} is {verdict}: {advice}"``: ``verdict`` is "invalid" unless the Check says
("out of range", "unknown"); ``advice`` is written from the type and bounds ("use an integer >= 1",
"use a number in (0, 1]", "use one of a, b", "use true or false") unless the Check gives its own;
``label`` is that of the class that *declares* the field (a ``DistillConfig`` says "distill train=…"
but its inherited ``TrainConfig`` fields say "steps=…"), unless the Check gives one (``label=""``
for an alias shared by configs whose messages carry no prefix, such as ``bits``).

Why ``Annotated`` rather than ``dataclasses.field(metadata=...)``: the rule stays in the type, on the
line with the name and the default, which read as before (``bits: Bits = 4``, not
``bits: int = field(default=4, metadata={...})``); a rule several configs share is one alias imported
like a type (``Bits``, ``GroupSize``, ``Sparsity``); and the same alias checks a plain function
argument (:func:`check_value`), where there is no field to carry metadata. ``Annotated`` is invisible
to ``dataclasses``: defaults, field order, equality and ``asdict`` are untouched. This module imports
only ``errors``, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from .errors import LlmpressError


@dataclass(frozen=True)
class Check:
    """What an annotation adds to its type: bounds, choices, a predicate, and how a refusal reads.

    ``ge``/``gt``/``le``/``lt``: inclusive/exclusive bounds of a number; ``choices``: the allowed
    values; ``rule``: a predicate the (well-typed) value must satisfy; ``verdict``: "invalid" unless
    given; ``advice``: the fix, written from the type and bounds unless given; ``label``: the prefix
    of the message, the declaring config's ``label`` unless given ("" for none).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    rule: Callable[[Any], bool] | None = None
    verdict: str | None = None
    advice: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))


PositiveInt = Annotated[int, Check(ge=1, advice="use a positive integer")]


def _same(value: Any, allowed: Any) -> bool:
    """Equal and of the same type: a choice of 1 is not met by True, nor 4 by 4.0."""
    return type(value) is type(allowed) and value == allowed


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


_KINDS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    bool: (_is_bool, "true or false"), int: (_is_int, "an integer"), float: (_is_number, "a number"),
    str: (_is_str, "text"),
}


@dataclass(frozen=True)
class _Spec:
    """A compiled annotation: the type test, the merged Check, and for tuples the items' specs."""

    test: Callable[[Any], bool]
    noun: str
    check: Check
    nullable: bool = False
    items: tuple[_Spec, ...] | None = None  # tuple[X, Y]: one per position; tuple[X, ...]: one, repeated
    repeat: bool = False

    def phrase(self) -> str:
        """The fix, without the leading "use ": given, or written from the type, bounds and choices."""
        if self.check.advice is not None:
            return self.check.advice.removeprefix("use ")
        c = self.check
        if c.choices is not None:
            text = "one of " + ", ".join(str(choice) for choice in c.choices)
        else:
            text = self.noun + _bounds(c, self.noun)
        return text + (" or null" if self.nullable else "")

    def refusal(self, name: str, value: Any, label: str) -> LlmpressError:
        label = label if self.check.label is None else self.check.label
        prefix = f"{label} " if label else ""
        advice = self.check.advice if self.check.advice is not None else "use " + self.phrase()
        return LlmpressError(f"{prefix}{name}={value!r} is {self.check.verdict or 'invalid'}: {advice}")

    def accepts(self, value: Any) -> tuple[bool, Any]:
        """(whether ``value`` passes, the value to store: a list given for a tuple becomes a tuple)."""
        if value is None:
            return self.nullable, value
        if not self.test(value):
            return False, value
        c = self.check
        if c.choices is not None and not any(_same(value, choice) for choice in c.choices):
            return False, value
        if not _within(value, c) or (c.rule is not None and not c.rule(value)):
            return False, value
        if self.items is None:
            return True, value
        specs = self.items * len(value) if self.repeat else self.items
        if len(specs) != len(value):
            return False, value
        stored = []
        for spec, item in zip(specs, value):
            ok, item = spec.accepts(item)
            if not ok:
                return False, value
            stored.append(item)
        return True, tuple(stored)


def _bounds(c: Check, noun: str) -> str:
    low = (c.ge, "[") if c.ge is not None else (c.gt, "(") if c.gt is not None else None
    high = (c.le, "]") if c.le is not None else (c.lt, ")") if c.lt is not None else None
    if low and high:
        if low[1] == "[" and high[1] == "]" and noun == "an integer":
            return f" from {low[0]} to {high[0]}"
        return f" in {low[1]}{low[0]}, {high[0]}{high[1]}"
    if low:
        return f" {'>=' if low[1] == '[' else '>'} {low[0]}"
    if high:
        return f" {'<=' if high[1] == ']' else '<'} {high[0]}"
    return ""


def _within(value: Any, c: Check) -> bool:
    if all(bound is None for bound in (c.ge, c.gt, c.le, c.lt)):
        return True
    if not isinstance(value, (int, float)):
        return False
    return ((c.ge is None or value >= c.ge) and (c.gt is None or value > c.gt)
            and (c.le is None or value <= c.le) and (c.lt is None or value < c.lt))


def _merge(checks: list[Check]) -> Check:
    """One Check from several (an alias wrapped again): a later field given overrides an earlier one."""
    merged = Check()
    for check in checks:
        given = {f.name: getattr(check, f.name) for f in dataclasses.fields(check)}
        merged = dataclasses.replace(merged, **{k: v for k, v in given.items() if v is not None})
    return merged


def compile_annotation(hint: Any, outer: tuple[Check, ...] = ()) -> _Spec:
    """The spec of an annotation (see the module docstring for what each kind accepts)."""
    checks = list(outer)
    while get_origin(hint) is Annotated:
        checks = [m for m in hint.__metadata__ if isinstance(m, Check)] + checks
        hint = get_args(hint)[0]
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(hint) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"a config field is one type or that type | None, not {hint}")
        return dataclasses.replace(compile_annotation(members[0], tuple(checks)), nullable=True)
    if origin is Literal:
        values = get_args(hint)
        checks = [Check(choices=values)] + checks
        return _Spec(lambda v: any(_same(v, a) for a in values), "one of the values", _merge(checks))
    if origin is tuple or hint is tuple:
        args = get_args(hint)
        repeat = len(args) == 2 and args[1] is Ellipsis
        items = tuple(compile_annotation(a) for a in (args[:1] if repeat else args)) or (compile_annotation(Any),)
        noun = "a list, each item " + items[0].phrase() if repeat or hint is tuple else f"a list of {len(items)} items"
        return _Spec(lambda v: isinstance(v, (tuple, list)), noun, _merge(checks), items=items,
                     repeat=repeat or hint is tuple)
    if hint is Any:
        return _Spec(lambda v: True, "a value", _merge(checks))
    if hint in _KINDS:
        test, noun = _KINDS[hint]
        return _Spec(test, noun, _merge(checks))
    if isinstance(hint, type):
        return _Spec(lambda v: isinstance(v, hint), f"a {hint.__name__}", _merge(checks))
    raise TypeError(f"a config field cannot be annotated {hint!r}")


def check_value(name: str, value: Any, hint: Any, label: str = "") -> Any:
    """Check one value against an annotation, as a config field would be; returns the value to keep
    (a list given for a tuple comes back a tuple). ``label`` prefixes the message unless the
    annotation's Check names its own. Raises LlmpressError with a one-line message."""
    spec = compile_annotation(hint)
    ok, stored = spec.accepts(value)
    if not ok:
        raise spec.refusal(name, value, label)
    return stored


@functools.cache
def _field_specs(cls: type) -> tuple[tuple[str, _Spec, str], ...]:
    """(name, spec, label) of each field of ``cls``; computed once per class (type hints are slow)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    table = []
    for field in dataclasses.fields(cls):
        owner = next(k for k in cls.__mro__ if field.name in vars(k).get("__annotations__", {}))
        table.append((field.name, compile_annotation(hints[field.name]), getattr(owner, "label", "")))
    return tuple(table)


class Config:
    """Base of the frozen config dataclasses: every field checked against its annotation, in order,
    then :meth:`check` for the rules between fields. ``label`` prefixes the messages of the fields
    a class declares (e.g. "awq")."""

    label: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, spec, label in _field_specs(type(self)):
            value = getattr(self, name)
            ok, stored = spec.accepts(value)
            if not ok:
                raise spec.refusal(name, value, label)
            if stored is not value:
                object.__setattr__(self, name, stored)
        self.check()

    def check(self) -> None:
        """Rules that tie fields together; each field has already passed its annotation. None here."""
