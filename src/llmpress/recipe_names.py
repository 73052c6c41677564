"""Recipe names: "A+B+C(k=v, ...)" read into the built-in recipes (and method stages) they name, in order.

``llmpress.recipe.load_recipe`` calls :func:`compose` for any name that is not a built-in recipe or a
file; the built-in recipes come from ``llmpress.registry``, where each method registers its own.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import LlmpressError
from .registry import builtin_recipes, get_method

MAX_NESTING = 50  # brackets or YAML collections inside each other

# the setting a bare first argument of NAME(...) gives, e.g. distill(kl, steps=200)
POSITIONAL = {"distill": "loss"}
_STAGE_KEYS = ("targets", "ignore")


def compose(text: str) -> list[dict] | None:
    """The recipes that ``text`` ("A+B+C(k=v, ...)") names, in order; None if it names none.

    Plain parts are built-in names (which may contain '+' themselves: awq+gptq-w4-g64). A part
    ``NAME(args)`` is a one-stage built-in or a method with those arguments added: ``key=value``
    (YAML values; ``targets``/``ignore`` set the stage's layer patterns) and, for the methods in
    ``POSITIONAL``, one bare value first.
    """
    if len(text) > 10_000 or _depth(text) > MAX_NESTING:
        raise LlmpressError(f"recipe name '{text[:40]}…' is too long or nests too deep: write a YAML recipe file")
    parts = _split_top(text, "+")
    if parts is None:
        if any(c in text for c in "()[]{}"):
            raise LlmpressError(f"recipe '{text}' has unbalanced brackets: write NAME(key=value, ...)")
        return None
    out, run = [], []
    for part in [*parts, None]:
        if part is not None and "(" not in part:
            run.append(part.strip())
            continue
        if run:
            names = _builtin_parts(run)
            if names is None and "(" not in text:
                return None  # not a composition: load_recipe tries it as a file, then says what is unknown
            if names is None:
                raise LlmpressError(f"unknown recipe '{'+'.join(run)}' in '{text}': use built-in names "
                                    f"({', '.join(builtin_recipes())}) or NAME(key=value, ...)")
            out += [builtin_recipes()[n] for n in names]
            run = []
        if part is not None:
            out.append(_call(part, text))
    return out


def _depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        deepest = max(deepest, depth)
    return deepest


def _split_top(text: str, sep: str) -> list[str] | None:
    """``text`` split at ``sep`` outside brackets; None when the brackets do not balance."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return None
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return None if depth else [*parts, text[start:]]


def _call(part: str, text: str) -> dict:
    """The one-stage recipe of ``NAME(args)`` (see :func:`_composed`)."""
    name, _, rest = part.strip().partition("(")
    name = name.strip()
    if not rest.endswith(")"):
        raise LlmpressError(f"'{part.strip()}' in recipe '{text}' has text after ')': write NAME(key=value, ...)")
    if name in builtin_recipes():
        base = builtin_recipes()[name]
        if len(base["stages"]) != 1:
            raise LlmpressError(f"built-in recipe '{name}' has {len(base['stages'])} stages, so '{part.strip()}' "
                                "cannot tell which one the arguments are for: write the stages out, "
                                "or use a YAML recipe")
        stage = dict(base["stages"][0])
    else:
        stage = {"method": get_method(name).name}
    stage["args"] = dict(stage.get("args") or {})
    items = [i.strip() for i in _split_top(rest[:-1], ",") or []]
    items = [] if items == [""] else items
    for k, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            field = POSITIONAL.get(stage["method"])
            if k or field is None:
                raise LlmpressError(f"argument '{item}' of '{part.strip()}' in recipe '{text}' has no name: "
                                    "write key=value")
            key, value = field, item
        key = key.strip()
        parsed = _value(value.strip())
        if key in _STAGE_KEYS:
            stage[key] = parsed
        else:
            stage["args"][key] = parsed
    recipe = {"stages": [stage]}
    if name in builtin_recipes() and "calibration" in builtin_recipes()[name]:
        recipe["calibration"] = builtin_recipes()[name]["calibration"]
    return recipe


def _value(text: str) -> Any:
    """A command-line value: a number (1e-3 included), true/false/null, a YAML list or mapping or quoted
    text; anything else stays text (so 2:4 is the pattern, not YAML 1.1's sexagesimal 124)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false", "null") or (text and text[0] in "[{'\""):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise LlmpressError(f"value {text!r} in a recipe name is not valid YAML: fix its brackets or quotes") \
                from None
    return text


def _builtin_parts(parts: list[str]) -> list[str] | None:
    """``parts`` (a name split at '+') regrouped into consecutive built-in names, longest first; None if impossible.

    Built-in names may contain '+' themselves (awq+gptq-w4-g64). The stages of the recipes run in order;
    the calibration is the first one that sets it (e.g. GPTQ's bfloat16 forwards), else the default.
    """
    if not parts:
        return []
    for k in range(len(parts), 0, -1):
        head = "+".join(parts[:k])
        rest = _builtin_parts(parts[k:]) if head in builtin_recipes() else None
        if rest is not None:
            return [head, *rest]
    return None
