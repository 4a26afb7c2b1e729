"""Formatting of byte counts and numbers for tables (GiB/GB appear only here)."""

from __future__ import annotations

GiB = 1024**3
MiB = 1024**2


def gib(n_bytes: float, digits: int = 2) -> str:
    """Bytes as GiB with fixed decimals."""
    return f"{n_bytes / GiB:.{digits}f}"


def human_bytes(n_bytes: float) -> str:
    """Bytes with a unit picked by magnitude (KiB, MiB, GiB)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{int(n_bytes)} B"


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def signed_pct(predicted: float, measured: float) -> str:
    """(predicted - measured) / measured as a signed percentage."""
    if not measured:
        return "n/a"
    return f"{100 * (predicted - measured) / measured:+.1f}%"


def seconds(s: float) -> str:
    """A duration picked by magnitude: 0.0123 -> '12.3 ms', 5400 -> '1.50 h', 200000 -> '2.31 d'."""
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.2f} h"
    return f"{s / 86400:.2f} d"


def usd(x: float | None) -> str:
    return "-" if x is None else (f"${x:,.2f}" if x < 1000 else f"${x:,.0f}")
