"""One conversion for every size setting: GB floats (LMCache's unit) and Kubernetes quantities."""

from __future__ import annotations

import math
import re

GIB = 1024**3

# Kubernetes quantity suffixes (binary and decimal) as multipliers of one byte.
_SUFFIXES: dict[str, int] = {
    "": 1,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "E": 1000**6,
}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]{0,2})\s*$")


class SizeError(ValueError):
    """A size could not be understood."""


def size_to_bytes(value: object, *, bare_unit: int = GIB) -> int:
    """Convert a size to bytes.

    Numbers and suffix-less strings are in ``bare_unit`` (GiB by default, as LMCache's
    ``max_local_cpu_size: 5.0`` means 5 GiB); strings may carry a Kubernetes suffix
    (``"4Gi"``, ``"512Mi"``, ``"8G"``).
    """
    if isinstance(value, bool):
        raise SizeError(f"expected a size, got a boolean {value!r}")
    if isinstance(value, int | float):
        number = float(value)
        multiplier = bare_unit
    elif isinstance(value, str):
        match = _QUANTITY.match(value)
        if match is None:
            raise SizeError(
                f"{value!r} is not a size: use a number of GB (5.0) or a Kubernetes "
                "quantity such as 4Gi, 512Mi or 8G"
            )
        number = float(match.group(1))
        suffix = match.group(2)
        if suffix not in _SUFFIXES:
            raise SizeError(
                f"{value!r} has an unknown unit {suffix!r}: use one of "
                + ", ".join(s for s in _SUFFIXES if s)
            )
        multiplier = _SUFFIXES[suffix] if suffix else bare_unit
    else:
        raise SizeError(f"expected a size, got {type(value).__name__} {value!r}")
    if not math.isfinite(number) or number < 0:
        raise SizeError(f"size {value!r} must be a finite, non-negative number")
    return int(number * multiplier)


def size_to_gb(value: object) -> float:
    """Convert a size to LMCache's GB unit (GiB), the unit of ``max_local_cpu_size``."""
    return size_to_bytes(value) / GIB


def format_bytes(nbytes: int) -> str:
    """Human-readable size for logs (binary units)."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
