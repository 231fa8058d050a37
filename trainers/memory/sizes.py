"""Byte sizes as users type them (`24GiB`, `8GB`: sweep.memory_limit, `--memory`) and as the
project shows them: limits and estimates in the plan and `python -m trainers.memory`, the memory
cells of the report (a mean and its spread)."""

from __future__ import annotations

import math
import re

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
SHOWN_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def parse_size(value: object) -> int:
    """Bytes of `24GiB`, `512MiB`, `8GB` (decimal units), `1.5GiB` or a plain byte count; ValueError
    saying what is accepted otherwise (a bare `24G` is refused: GiB or GB?)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, (int, float)):
        number, unit = float(value), "b"
    else:
        match = SIZE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 24GiB, 512MiB, 8GB or a byte count")
        number, unit = float(match.group(1)), (match.group(2) or "b").lower()
        if unit not in UNITS:
            raise ValueError(f"{value!r}: unknown unit {match.group(2)!r}; units: B, KiB, MiB, GiB, TiB "
                             "(binary) or KB, MB, GB, TB (decimal)")
    size = int(number * UNITS[unit])
    if size < 1 or not math.isfinite(number):
        raise ValueError(f"{value!r}: a size must be positive")
    return size


def format_size(n: float, spread: float | None = None) -> str:
    """'4.00 GiB', '23.5 GiB', '12.3 ± 0.4 MiB': the largest binary unit not above |n|, with two
    decimals below 10 of it and one above (an estimate of 8.04 GiB and a limit of 8 GiB read
    apart); a spread in the same unit and decimals as the mean."""
    unit, size = next(((u, s) for u, s in SHOWN_UNITS if abs(n) >= s), ("B", 1))
    digits = 0 if size == 1 else 2 if abs(n) < 10 * size else 1
    text = f"{n / size:,.{digits}f}"
    if spread is not None:
        text += f" ± {spread / size:,.{digits}f}"
    return f"{text} {unit}"
