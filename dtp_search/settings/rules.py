"""What a settings field allows beyond its type (:class:`Rule`, :func:`rule`), in words
(:func:`allowed`), and the one check of every rule (:func:`check`), whose message is the
one-line ``key=value is not allowed; allowed: …`` the CLI prints."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# Seeds go to scikit-learn and numpy, which take [0, 2**32).
SEED_HIGH = 2**32


@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its type: ``low <= value < high`` (``above``: strictly
    greater; ``at_most``: ``value <= at_most``), one of ``choices``, or ``each`` of a
    list's items among ``choices``."""

    low: float | None = None
    high: float | None = None
    at_most: float | None = None
    above: float | None = None
    choices: tuple[Any, ...] | None = None
    each: bool = False
    words: str | None = None  # what is allowed, where the type and limits say too little

    def allows(self, value: Any) -> bool:
        if value is None:
            return True  # Optional fields: the type already allowed null
        if self.choices is not None:
            items = value if self.each else [value]
            return bool(items) and all(v in self.choices for v in items)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # not a number: the type check is OmegaConf's
        return (
            math.isfinite(value)
            and (self.low is None or value >= self.low)
            and (self.high is None or value < self.high)
            and (self.at_most is None or value <= self.at_most)
            and (self.above is None or value > self.above)
        )


def rule(default: Any = MISSING, **limits: Any) -> Any:
    """A dataclass field with ``default`` and a :class:`Rule` (``low``, ``high``,
    ``above``, ``at_most``, ``choices``, ``each``, ``words``)."""
    if "choices" in limits:
        limits["choices"] = tuple(limits["choices"])
    meta = {"rule": Rule(**limits)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def allowed(owner: type, name: str) -> str:
    """What field ``name`` of dataclass ``owner`` allows, in words: ``an integer >= 1``,
    ``null or a number in [0, 1)``, ``['sgd', 'adam']``, ``true, false``."""
    f = {f.name: f for f in dataclasses.fields(owner)}[name]
    hint = _hints(owner)[name]
    r: Rule = f.metadata.get("rule", Rule())
    null = "None" in hint
    if r.words is not None:
        return r.words
    if r.choices is not None:
        text = f"a non-empty list of {list(r.choices)}" if r.each else str(list(r.choices))
        return ("null or " if null else "") + text
    if "bool" in hint:
        return "true, false"
    if "list" in hint:
        item = "integers" if "int" in hint else "numbers" if "float" in hint else "values"
        noun = f"a list of {item}"
    elif "dict" in hint:
        noun = "a mapping"
    elif "int" in hint and "float" not in hint:
        noun = "an integer"
    elif "float" in hint:
        noun = "a number"
    else:
        noun = "a text"
    if r.low is not None and r.at_most is not None:
        span = f" in [{r.low}, {r.at_most}]"
    elif r.above is not None and r.high is not None:
        span = f" in ({r.above}, {r.high})"
    elif r.low is not None and r.high is not None:
        span = (
            f" in [{r.low}, {r.high - 1}]" if noun == "an integer" else f" in [{r.low}, {r.high})"
        )
    elif r.low is not None:
        span = f" >= {r.low}"
    elif r.above is not None:
        span = f" > {r.above}"
    elif r.high is not None:
        span = f" < {r.high}"
    else:
        span = ""
    return ("null or " if null else "") + noun + span


def _hints(owner: type) -> dict[str, str]:
    # Annotations are strings (``from __future__ import annotations``); the words in
    # them are all `allowed` needs, and reading them avoids evaluating forward references.
    return {f.name: str(f.type) for f in dataclasses.fields(owner)}


def check(obj: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` (``key=value is not allowed; allowed: …``) for the first field
    of ``obj`` or of its nested settings that breaks its :class:`Rule`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check(value, key + ".")
            continue
        r = f.metadata.get("rule")
        if r is not None and not r.allows(value):
            raise ValueError(
                f"{key}={_show(value)} is not allowed; allowed: {allowed(type(obj), f.name)}"
            )
    extra = getattr(obj, "_check", None)
    if extra is not None:
        extra(prefix)


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, (list, tuple)) else repr(value)
