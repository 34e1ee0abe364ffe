"""Plot buffers for the live checkup, kept without Qt so they can be unit-tested.

The run page feeds probe records in as they arrive; a timer redraws from these buffers at
most ~30 times a second, updating plot items in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from modeldoctor.report.results import ProbeRecord

SEVERITY_COLORS = {  # healthy -> bleeding
    "healthy": (58, 157, 93),
    "mild": (224, 177, 58),
    "moderate": (224, 123, 57),
    "severe": (200, 55, 59),
}
KL_FLOOR = 1e-6  # log plots start here


def log_kl(value: float) -> float:
    return math.log10(max(value, KL_FLOOR))


@dataclass
class Bars:
    labels: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # mean KL
    severities: list[str] = field(default_factory=list)
    records: list[ProbeRecord] = field(default_factory=list)
    estimated: list[bool] = field(default_factory=list)  # drawn pale and outlined until measured

    def heights(self) -> np.ndarray:
        return np.array([log_kl(v) - math.log10(KL_FLOOR) for v in self.values])

    def colors(self) -> list[tuple[int, int, int]]:
        return [SEVERITY_COLORS[s] for s in self.severities]

    def worst(self, count: int = 3) -> list[int]:
        """Indices of the worst bleeding bars, worst first."""
        bleeding = [i for i, s in enumerate(self.severities) if s != "healthy"]
        return sorted(bleeding, key=lambda i: self.values[i], reverse=True)[:count]


ESTIMATED_ALPHA = 90  # an estimate is drawn pale until it is measured


def verdict_color(record: ProbeRecord) -> tuple[int, int, int]:
    """The colour of a probe's verdict: the bars and the heatmap share it."""
    return SEVERITY_COLORS[record.severity if record.bleeding else "healthy"]


@dataclass
class HeatCells:
    """The heatmap: log10 KL per cell (NaN where nothing is measured yet) and each cell's RGBA colour,
    the same verdict colour as its bar; a cell not measured yet is transparent (drawn hatched)."""

    kl: np.ndarray
    colors: np.ndarray  # (rows, cols, 4) uint8
    rows: list[str]
    cols: list[str]
    records: dict[tuple[int, int], ProbeRecord] = field(default_factory=dict)


class CheckupViewModel:
    """Everything the run page draws, rebuilt incrementally from probe records."""

    def __init__(self, threshold: float = 0.01) -> None:
        self.threshold = threshold
        self.records: list[ProbeRecord] = []
        self.selected: str | None = None  # modification shown in the bar chart
        self.planned: list = []  # isolated ProbeSpecs of the run under way (the heatmap's full grid)
        self.version = 0  # bumped on every change; the view redraws when it moved

    def reset(self, threshold: float) -> None:
        self.threshold = threshold
        self.records = []
        self.selected = None
        self.planned = []
        self.version += 1

    def add(self, record: ProbeRecord) -> None:
        """A new probe's record, or the measured record of a probe shown as estimated so far."""
        same = next((i for i, r in enumerate(self.records) if r.spec == record.spec), None)
        if same is None:
            self.records.append(record)
        else:
            self.records[same] = record
        if self.selected is None and record.spec.mode == "isolated":
            self.selected = record.spec.modification
        self.version += 1

    def replace_all(self, records: list[ProbeRecord]) -> None:
        """After the run: the final verdicts (outliers included) replace the live ones."""
        self.records = list(records)
        isolated = self.modifications()
        if self.selected not in isolated:
            self.selected = isolated[0] if isolated else None
        self.version += 1

    def select(self, modification: str) -> None:
        self.selected = modification
        self.version += 1

    def modifications(self) -> list[str]:
        return list(dict.fromkeys(r.spec.modification for r in self.records if r.spec.mode == "isolated"))

    def bars(self) -> Bars:
        bars = Bars()
        for rec in self.records:
            if rec.spec.mode == "isolated" and rec.spec.modification == self.selected:
                bars.labels.append(rec.spec.target)
                bars.values.append(rec.score)
                bars.severities.append(rec.severity if rec.bleeding else "healthy")  # = verdict_color
                bars.records.append(rec)
                bars.estimated.append(rec.estimated)
        return bars

    def estimated_count(self) -> tuple[int, int]:
        """(estimated only, all) isolated probes of the selected modification."""
        mine = [r for r in self.records if r.spec.mode == "isolated" and r.spec.modification == self.selected]
        return sum(r.estimated for r in mine), len(mine)

    def expect(self, specs: list) -> None:
        """The planned probes: the heatmap's grid is complete from the start, unmeasured cells empty."""
        self.planned = [spec for spec in specs if spec.mode == "isolated"]
        self.version += 1

    def linear_scope(self) -> bool:
        """Probes of single linears (the heatmap is then blocks x linears of one modification)."""
        specs = self.planned + [r.spec for r in self.records if r.spec.mode == "isolated"]
        return any(not spec.targets[0].isdigit() for spec in specs)

    def heatmap(self) -> HeatCells:
        """Block scope: layers x modifications. Linear scope: blocks x sub-layers of the
        selected modification."""
        isolated = [r for r in self.records if r.spec.mode == "isolated"]
        if self.linear_scope():
            chosen = [r for r in isolated if r.spec.modification == self.selected]
            specs = [s for s in self.planned if s.modification == self.selected] + [r.spec for r in chosen]
            # "3.mlp.down_proj" -> row 3, column mlp.down_proj; the LM head ("head") is its own row and column
            key = lambda spec: tuple((spec.targets[0].split(".", 1) * 2)[:2])  # noqa: E731
        else:
            chosen = isolated
            specs = self.planned + [r.spec for r in chosen]
            key = lambda spec: (spec.targets[0], spec.modification)  # noqa: E731
        rows = list(dict.fromkeys(key(spec)[0] for spec in specs))
        cols = list(dict.fromkeys(key(spec)[1] for spec in specs))
        cells = HeatCells(np.full((len(rows), len(cols)), np.nan), np.zeros((len(rows), len(cols), 4), np.uint8),
                          rows, cols)
        row_index = {v: i for i, v in enumerate(rows)}
        col_index = {v: i for i, v in enumerate(cols)}
        for rec in chosen:
            r, c = key(rec.spec)
            at = (row_index[r], col_index[c])
            cells.kl[at] = log_kl(rec.score)
            cells.colors[at] = (*verdict_color(rec), ESTIMATED_ALPHA if rec.estimated else 255)
            cells.records[at] = rec
        return cells

    def cumulative(self) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
        """modification -> (k, mean KL, first k that bleeds)."""
        curves = {}
        for name in dict.fromkeys(r.spec.modification for r in self.records if r.spec.mode == "cumulative"):
            recs = [r for r in self.records if r.spec.mode == "cumulative" and r.spec.modification == name]
            crossing = next((r.spec.step for r in recs if r.score > self.threshold), None)
            curves[name] = (np.array([r.spec.step for r in recs], float), np.array([r.score for r in recs]), crossing)
        return curves

    def sweeps(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """sweep group -> (strengths, whole-model mean KL), in probe order."""
        from modeldoctor.checkup.verdict import sweep_groups

        return {group: (np.array([r.spec.strength for r in recs], float), np.array([r.score for r in recs]))
                for group, recs in sweep_groups(self.records, "sweep-model").items()}


@dataclass
class BeforeAfter:
    """Per-layer bars of one treatment: before and after on the same log axis."""

    labels: list[str] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    threshold: float = 0.01

    @classmethod
    def from_outcome(cls, outcome, threshold: float) -> "BeforeAfter":
        layers = getattr(outcome, "layers", None) or {}
        return cls(list(layers.get("targets", [])), list(layers.get("before", [])), list(layers.get("after", [])),
                   threshold)

    def heights(self, values: list[float]) -> np.ndarray:
        return np.array([log_kl(v) - math.log10(KL_FLOOR) for v in values])

    def after_colors(self) -> list[tuple[int, int, int]]:
        from modeldoctor.checkup.verdict import severity

        return [SEVERITY_COLORS[severity(v, self.threshold)] for v in self.after]

    def worst_after(self, count: int = 3) -> list[int]:
        bleeding = [i for i, v in enumerate(self.after) if v > self.threshold]
        return sorted(bleeding, key=lambda i: self.after[i], reverse=True)[:count]
