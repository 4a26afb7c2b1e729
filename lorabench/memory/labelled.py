"""Byte counts that remember what they are the sum of, so ``--explain`` prints the prediction's own terms.

``part("layer inputs", n)`` is an int; adding labelled ints keeps every part, so a component computed as
``a + b + c`` carries ``(label_a, a), (label_b, b), (label_c, c)``, and the explanation can never drift from
the number it explains (tests/memory/test_explain.py checks that the parts sum to each component).
"""

from __future__ import annotations

from typing import Any


class Bytes(int):
    """An int with ``parts``: the labelled terms it is the sum of (unlabelled plain ints get the label "")."""

    parts: tuple[tuple[str, int], ...]

    def __new__(cls, value: int, parts: tuple[tuple[str, int], ...] | None = None) -> "Bytes":
        obj = super().__new__(cls, int(value))
        obj.parts = parts if parts is not None else ((("", int(value)),) if value else ())
        return obj

    def __add__(self, other: Any) -> Any:
        if isinstance(other, int):
            return Bytes(int(self) + int(other), self.parts + parts_of(other))
        return NotImplemented

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, int):
            return Bytes(int(other) + int(self), parts_of(other) + self.parts)
        return NotImplemented


def part(label: str, value: int) -> Bytes:
    """One labelled term (zero-valued terms carry no part)."""
    return Bytes(int(value), ((label, int(value)),) if value else ())


def parts_of(value: int) -> tuple[tuple[str, int], ...]:
    if isinstance(value, Bytes):
        return value.parts
    return (("", int(value)),) if value else ()
