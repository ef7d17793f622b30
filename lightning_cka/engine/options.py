"""Checks of constructor arguments that name the argument, the accepted values and what was given.

Used by every analysis and by the monitor's units, so that a bad argument fails where it is written (at
construction, also from LightingCLI's YAML) with one line, never later inside training. NumPy integers count as
integers and NumPy floats as numbers; ``bool`` is not an integer here.
"""

import numbers
from collections.abc import Sequence
from typing import Any


def integer(owner: str, name: str, value: Any, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` when it is an integer in ``[low, high]``; else ``ValueError``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
        if (low is None or value >= low) and (high is None or value <= high):
            return value
    bounds = (
        f" in [{low}, {high}]"
        if low is not None and high is not None
        else f" >= {low}"
        if low is not None
        else f" <= {high}"
        if high is not None
        else ""
    )
    raise ValueError(f"{owner}: {name} must be an int{bounds}{f' ({hint})' if hint else ''}, got {value!r}.")


def number(owner: str, name: str, value: Any, low: float, high: float, hint: str = "", open_low: bool = True) -> float:
    """``value`` as a ``float`` when it is a real number in ``(low, high]`` (``[low, high]`` unless ``open_low``)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
        if (value > low if open_low else value >= low) and value <= high:
            return value
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    raise ValueError(f"{owner}: {name} must be a number in {interval}{f' ({hint})' if hint else ''}, got {value!r}.")


def flag(owner: str, name: str, value: Any) -> bool:
    """``value`` when it is ``True`` or ``False`` (NumPy bools too)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ValueError(f"{owner}: {name} must be True or False, got {value!r}.")


def choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` when it is one of ``choices``."""
    if isinstance(value, str | bool | None) and value in choices:
        return value
    raise ValueError(f"{owner}: {name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")


def optional_text(owner: str, name: str, value: Any, what: str) -> str | None:
    """``value`` when it is ``None`` or a non-empty string."""
    if value is None or (isinstance(value, str) and value):
        return value
    raise ValueError(f"{owner}: {name} must be {what} (a non-empty string) or None, got {value!r}.")


def layer_spec(owner: str, name: str, value: Any) -> str | list[str]:
    """``value`` when it is ``"auto"``, a module name or glob pattern, or a non-empty list of them."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(x, str) and x for x in value):
        return list(value)
    raise ValueError(
        f"{owner}: {name} must be 'auto', a module name or glob pattern, or a list of them, got {value!r}."
    )
