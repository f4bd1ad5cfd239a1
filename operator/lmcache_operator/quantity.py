"""Kubernetes resource quantities ("4Gi", "512Mi", "1.5G", "100") as exact numbers.

The operator cannot import the node's size helpers (import boundary), so it keeps its own
small parser; it accepts the Kubernetes quantity grammar for memory-like values.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_FACTORS = {
    "": 1,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "E": 1000**6,
}
GIB = 1024**3
MIB = 1024**2


class QuantityError(ValueError):
    """A quantity that is not of the form <number><suffix>, e.g. 4Gi or 512Mi."""


def parse_bytes(value: str | int) -> int:
    """Bytes of a quantity; fractions of a byte are rounded up."""
    text = str(value).strip()
    match = _QUANTITY_RE.match(text)
    if match is None:
        raise QuantityError(
            f"{text!r} is not a Kubernetes quantity: write a number with an optional suffix "
            "(Ki, Mi, Gi, Ti or k, M, G, T), e.g. 4Gi or 512Mi"
        )
    suffix = match.group(2) or ""
    number_text = text[: len(text) - len(suffix)]
    try:
        number = Decimal(number_text)
    except InvalidOperation:  # pragma: no cover - the pattern already guarantees a number
        raise QuantityError(f"{text!r} has no valid number part") from None
    total = number * _FACTORS[suffix]
    return int(total.to_integral_value(rounding="ROUND_CEILING"))


def to_gib(nbytes: int) -> float:
    """GiB as a float rounded to 6 decimals (the node's GB config unit)."""
    return round(nbytes / GIB, 6)


def format_mebibytes(nbytes: int) -> str:
    """A quantity string in whole Mi, rounded up (how the operator writes memory)."""
    return f"{-(-nbytes // MIB)}Mi"
