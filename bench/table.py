"""The bench's one output: a fixed-column markdown table, one row per measured case.

The format is stable on purpose (same columns, same order, fixed number formats) so that the outputs
of two commits can be diffed. A target is written ``<=1.15`` or ``>=20``; its status column is
``PASS`` or ``MISS`` against the row's ratio, ``-`` where the row has no target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

COLUMNS = ("section", "case", "layout", "median", "unit", "ratio", "target", "status",
           "saved_MiB", "saved_ratio", "saved_target", "saved_status")


@dataclass(frozen=True)
class Target:
    """A bound on a ratio: ``ratio <= bound`` (``at_most``) or ``ratio >= bound``."""

    bound: float
    at_most: bool = True

    def met(self, ratio: float) -> bool:
        return ratio <= self.bound if self.at_most else ratio >= self.bound

    def __str__(self) -> str:
        return f"{'<=' if self.at_most else '>='}{self.bound:g}"


@dataclass(frozen=True)
class Row:
    """One measurement: a median (ms per call, or images/s) and its ratio to the section's baseline.

    ``saved_bytes`` / ``saved_ratio`` are the bytes kept for backward and their ratio, where measured.
    """

    section: str
    case: str
    layout: str
    median: float
    unit: str
    ratio: float
    target: Optional[Target] = None
    saved_bytes: Optional[int] = None
    saved_ratio: Optional[float] = None
    saved_target: Optional[Target] = None

    def cells(self) -> list[str]:
        return [self.section, self.case, self.layout, _number(self.median, 3 if "ms" in self.unit else 0),
                self.unit, _number(self.ratio, 3), str(self.target or "-"), _status(self.target, self.ratio),
                "-" if self.saved_bytes is None else f"{self.saved_bytes / 2 ** 20:.2f}",
                _number(self.saved_ratio, 3), str(self.saved_target or "-"),
                _status(self.saved_target, self.saved_ratio)]


def _number(value: Optional[float], decimals: int) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.{decimals}f}"


def _status(target: Optional[Target], ratio: Optional[float]) -> str:
    if target is None:
        return "-"
    if ratio is None or math.isnan(ratio):
        return "MISS"  # no measurement (e.g. a failed subprocess) cannot meet a target
    return "PASS" if target.met(ratio) else "MISS"


def format_table(rows: Iterable[Row]) -> str:
    """The rows as a markdown table whose columns are padded to a common width."""
    body = [row.cells() for row in rows]
    widths = [max([len(name)] + [len(cells[i]) for cells in body]) for i, name in enumerate(COLUMNS)]

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(COLUMNS), separator] + [line(cells) for cells in body])
