"""Config values as YAML gives them, checked with lrpcli's one-line wording: ``expected ..., got ...``.

YAML is looser than Python (``1e-6`` reads as a string, ``mode: rgb`` means RGB), so these checks accept those
spellings, return the canonical value and refuse anything else with a :class:`Bad` that says what is allowed and
where below the current key it is (``[1]``, ``.mode``); ``lrpcli.spec.config`` adds the file and the key path.
"""

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

__all__ = ["Bad", "show", "plain", "did_you_mean", "expected", "at", "is_number", "number", "integer", "boolean",
           "string", "choice", "mapping", "listed", "each", "known"]

_NUMBER_RE = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


class Bad(ValueError):
    """A refused value: the message and where below the field pydantic reports it is (``[1]``, ``.mode``)."""

    def __init__(self, message: str, sub: str = "") -> None:
        super().__init__(message)
        self.message, self.sub = message, sub


def show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML: strings quoted, null/true/false, long values shortened."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, Mapping | list | tuple):
        try:
            text = yaml.safe_dump(plain(value), default_flow_style=True, width=10**6).strip()
        except yaml.YAMLError:
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def did_you_mean(word: Any, candidates: list[str] | tuple[str, ...], *, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` when a candidate is close to ``word``, else an empty string."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=cutoff)
    if not close:
        lowered = {str(c).lower(): c for c in candidates}
        close = [lowered[str(word).lower()]] if str(word).lower() in lowered else []
    return f"; did you mean {close[0]!r}?" if close else ""


def expected(what: str, value: Any, sub: str = "") -> Bad:
    return Bad(f"expected {what}, got {show(value)}", sub)


def at(sub: str, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``check(*args)`` with its errors placed at ``sub`` below the current key."""
    try:
        return check(*args, **kwargs)
    except Bad as err:
        raise Bad(err.message, sub + err.sub) from None


def is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, str) and bool(_NUMBER_RE.match(value)))


def number(value: Any, minimum: float | None = None, strict: bool = False) -> float:
    """A finite number; numeric strings such as ``1e-6`` (which YAML 1.1 reads as a string) are accepted."""
    what = "a number" if minimum is None else f"a number {'>' if strict else '>='} {minimum:g}"
    got = float(value) if isinstance(value, str) and _NUMBER_RE.match(value) else value
    if not is_number(got) or not math.isfinite(got) or (
            minimum is not None and (got < minimum or (strict and got == minimum))):
        raise expected(what, value)
    return float(got)


def integer(value: Any, minimum: int | None = None, maximum: int | None = None, nullable: bool = False,
            above: str | None = None) -> Any:
    """An integer (``2.0`` too); a refusal names the range, or where ``above`` is given, names the minimum and
    says ``above`` for a value over ``maximum`` only."""
    what = "an integer" if minimum is None else f"an integer >= {minimum}"
    if maximum is not None and above is None:
        what = f"an integer from {minimum} to {maximum}"
    if nullable:
        what += " or null"
        if value is None:
            return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise expected(what, value)
    if maximum is not None and value > maximum:
        raise expected(above or what, value)
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise expected("true or false", value)
    return value


def string(value: Any, nullable: bool = False) -> Any:
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value.strip():
        raise expected("a non-empty string" + (" or null" if nullable else ""), value)
    return value


def choice(value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``, matched case-insensitively and returned in its canonical spelling."""
    if isinstance(value, str):
        for option in choices:
            if value.strip().lower() == option.lower():
                return option
    hint = did_you_mean(value, choices) if isinstance(value, str) else ""
    raise Bad(f"expected one of {', '.join(choices)}, got {show(value)}{hint}")


def mapping(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise expected("a mapping (key: value lines)", value)
    for key in value:
        if not isinstance(key, str):
            raise Bad(f"keys must be strings, got {show(key)}", f".{key}")
    return dict(value)


def listed(value: Any, what: str, nullable: bool = True, one: bool = False) -> list:
    """A list (None: empty where ``nullable``; a single string where ``one``: a list of it)."""
    if one and isinstance(value, str):
        value = [value]
    if value is None and nullable:
        return []
    if not isinstance(value, list | tuple):
        raise expected(what, value)
    return list(value)


def each(values: list, check: Callable[[Any], Any]) -> list:
    return [at(f"[{i}]", check, v) for i, v in enumerate(values)]


def known(kind: str, name: Any, names: tuple[str, ...] | list[str]) -> str:
    name = string(name)
    if name not in names:
        raise Bad(f"unknown {kind} {show(name)}{did_you_mean(name, names)} (known: {', '.join(names)})")
    return name
