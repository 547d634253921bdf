"""One vocabulary for checking a setting, shared by every layer (pure Python: the
optimizers import it too). Each check raises ``ValueError`` with one line naming the
setting, what it allows and what it got: ``start_step must be an integer >= 0, got -1``;
the caller passes the name as its user writes it (``model.hidden``, ``scheduler.frequency``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["allowed_keywords", "boolean", "choice", "fraction", "integer", "is_integer", "is_real", "real"]


def is_integer(value: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(name: str, value: Any, minimum: int | None = None, *, optional: bool = False, note: str = "") -> Any:
    """``value``, an integer >= ``minimum`` (None too where ``optional``); ``note`` says
    what a special value means, e.g. ``" (0: no logging within an epoch)"``."""
    if optional and value is None:
        return value
    if not is_integer(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}{note}{' or null' if optional else ''}, got {value!r}")
    return value


def real(name: str, value: Any, minimum: float = -math.inf, *, above: bool = False, finite: bool = True,
         note: str = "") -> Any:
    """``value``, a finite number (or inf, unless ``finite``) >= ``minimum`` (> where ``above``)."""
    number = is_real(value) or (not finite and value == math.inf and not isinstance(value, bool))
    if not number or value < minimum or (above and value == minimum):
        bound = "" if minimum == -math.inf else f" {'>' if above else '>='} {minimum:g}"
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"{name} must be {kind}{bound}{'' if finite else ' (or inf)'}{note}, got {value!r}")
    return value


def fraction(name: str, value: Any, *, closed: bool = False, note: str = "") -> Any:
    """``value``, a number in [0, 1) ([0, 1] where ``closed``)."""
    if not is_real(value) or not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise ValueError(f"{name} must be a number in [0, 1{']' if closed else ')'}{note}, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    """``value``, a bool (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (true or false), got {value!r}")
    return value


def choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value``, one of ``allowed``."""
    allowed = list(allowed)
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def allowed_keywords(where: str, given: Iterable[str], allowed: Iterable[str], owner: str,
                     what: str = "a field") -> None:
    """Every key of ``given`` among ``allowed``: ``where.key: not a field of owner;
    allowed: ...`` (``where`` is the config key they sit under: ``dataset``, ``scheduler``)."""
    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            listed = f"allowed: {', '.join(allowed)}" if allowed else f"{owner} takes none"
            raise ValueError(f"{where}.{key}: not {what} of {owner}; {listed}")
