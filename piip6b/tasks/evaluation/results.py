"""What an evaluation returns: summary metrics and per-class values, and their tables.

"Not applicable" is None everywhere (null in JSON, "n/a" in a table, no TensorBoard point), never
0: COCO reports -1 for an area range without ground-truth objects, and a class absent from the
ground truth (and, for IoU, from the predictions) has no IoU or accuracy. Averaging a 0 in would
lower the number; leaving the value out says what happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

NOT_APPLICABLE = "n/a"


@dataclass
class EvalResults:
    """`metrics`: the summary (TensorBoard curves, the console row), e.g. `bbox/AP`, `mIoU`.
    `per_class`: metric -> class name -> value, classes in the data set's order, e.g.
    `{"IoU": {"wall": 71.3, ...}, "Acc": {...}}` or `{"bbox/AP": {"person": 52.1, ...}, ...}`."""

    metrics: dict[str, float | None]
    per_class: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The summary, with the per-class values under "per_class" (`piip6b eval --out`)."""
        return {**self.metrics, "per_class": self.per_class} if self.per_class else dict(self.metrics)

    def class_table(self, markdown: bool = False) -> str:
        """One row per class, one column per per-class metric (percent, two decimals); plain
        aligned text for the log, or a markdown table for TensorBoard's Text tab."""
        columns = list(self.per_class)
        if not columns:
            return ""
        classes = list(self.per_class[columns[0]])
        rows = [[name, *(_format(self.per_class[c].get(name)) for c in columns)] for name in classes]
        header = ["class", *columns]
        if markdown:
            lines = [header, ["---", *("---:" for _ in columns)], *rows]
            return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        return "\n".join(
            "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))])
            for row in [header, *rows]
        )


def applicable(value: float) -> float | None:
    """`value`, or None for NaN (a 0/0 of a class that never occurs)."""
    return None if math.isnan(value) else value


def _format(value: float | None) -> str:
    return NOT_APPLICABLE if value is None else f"{value:.2f}"
