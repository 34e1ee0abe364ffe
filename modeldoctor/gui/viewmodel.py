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


# ---- the anatomy view: the model as its stack of blocks, one cell per linear ---------------------

KEPT_FP32 = (150, 150, 150)  # a linear the export leaves in fp32
# Each export format's colour, and its name in legends: 8 bits blue, 4 bits purple, larger
# blocks (coarser) in lighter shades of the same hue.
FORMAT_COLORS = {"int8": (92, 140, 200), "int8-b64": (130, 170, 220), "int8-b128": (170, 200, 235),
                 "int4": (150, 105, 190), "int4-b128": (195, 160, 225), "int8-dynamic": (70, 160, 150),
                 "fp32": KEPT_FP32}
FORMAT_COLOR_NAMES = {"int8": "blue", "int8-b64": "light blue", "int8-b128": "pale blue", "int4": "purple",
                      "int4-b128": "light purple", "int8-dynamic": "teal", "fp32": "grey"}
EMBEDDING = "embedding"


@dataclass
class AnatomyCell:
    name: str  # the linear ("3.mlp.down_proj", "head") or EMBEDDING
    color: tuple[int, int, int, int] | None  # None: nothing to show yet (drawn hatched)
    text: str  # what hovering says
    record: ProbeRecord | None = None
    outlined: bool = False  # e.g. kept in fp32 by the treatment


@dataclass
class AnatomyLayout:
    """Rows are blocks (embedding above, head below); columns are the block's linears in run order,
    grouped by the part they belong to (attention, MLP, ...)."""

    blocks: list[int]
    columns: list[str]  # relative linear names, "self_attn.q_proj"
    # The block linears that exist, where blocks differ (a hybrid's Mamba and attention blocks);
    # None: every block has every column.
    present: frozenset[str] | None = None

    @classmethod
    def from_names(cls, names: list[str]) -> "AnatomyLayout":
        blocks, columns, by_block = [], [], {}
        for name in names:
            if "." not in name or not name.split(".", 1)[0].isdigit():
                continue
            block, rest = name.split(".", 1)
            if int(block) not in blocks:
                blocks.append(int(block))
            by_block.setdefault(block, []).append(rest)
        for rests in by_block.values():
            # A column new to the layout goes before the first later column of its own block that
            # is already placed: a hybrid's attention columns sit beside its Mamba mixer's, before
            # the MLP both kinds of block share.
            for number, rest in enumerate(rests):
                if rest in columns:
                    continue
                later = next((columns.index(r) for r in rests[number + 1:] if r in columns), len(columns))
                columns.insert(later, rest)
        uniform = all(len(rests) == len(columns) for rests in by_block.values())
        present = None if uniform else frozenset(f"{b}.{r}" for b, rests in by_block.items() for r in rests)
        return cls(sorted(blocks), columns, present)

    def has(self, name: str) -> bool:
        """Whether the block linear "3.mlp.down_proj" is drawn (a hybrid's Mamba block has no q_proj)."""
        return self.present is None or name in self.present

    def groups(self) -> list[tuple[str, int]]:
        """(part name, number of columns) in column order: [("self_attn", 4), ("mlp", 3)]."""
        out: list[tuple[str, int]] = []
        for column in self.columns:
            part = column.split(".", 1)[0]
            if out and out[-1][0] == part:
                out[-1] = (part, out[-1][1] + 1)
            else:
                out.append((part, 1))
        return out


def checkup_cells(layout: AnatomyLayout, records: list[ProbeRecord], modification: str | None) -> dict[str, AnatomyCell]:
    """Each linear coloured by its probe's verdict under `modification`: its own probe at linear
    scope, its block's at block scope; estimates pale; not probed (yet): no colour."""
    mine = {r.spec.targets[0]: r for r in records
            if r.spec.mode == "isolated" and r.spec.modification == modification and len(r.spec.targets) == 1}
    cells: dict[str, AnatomyCell] = {}
    for block in layout.blocks:
        for column in layout.columns:
            name = f"{block}.{column}"
            record = mine.get(name) or _enclosing_probe(mine, name) or mine.get(str(block))
            cells[name] = _verdict_cell(name, record, block_level=record is not None and name not in mine)
    linear_scope = any(not target.isdigit() for target in mine)
    cells["head"] = (_verdict_cell("head", mine.get("head"), block_level=False) if linear_scope or "head" in mine
                     else AnatomyCell("head", None, "head: a block-scope checkup does not probe it (linear scope does)"))
    cells[EMBEDDING] = AnatomyCell(EMBEDDING, None, "token embedding: not probed (a lookup, not a matmul)")
    return cells


def _enclosing_probe(probes: dict[str, ProbeRecord], name: str) -> ProbeRecord | None:
    """The probe of the part a linear belongs to below its block, e.g. the expert "3.mlp.experts.5"
    of "3.mlp.experts.5.w1" (experts scope)."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 1, -1):
        found = probes.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def _verdict_cell(name: str, record: ProbeRecord | None, block_level: bool) -> AnatomyCell:
    if record is None:
        return AnatomyCell(name, None, f"{name}: not measured yet")
    how = "estimated" if record.estimated else "measured"
    target = record.spec.targets[0]
    where = (f" (its block's probe: block {target})" if target.isdigit() else f" (the probe of {target})") \
        if block_level else ""
    verdict = record.severity if record.bleeding else "healthy"
    text = f"{name}: mean KL {record.score:.4g} nats, {how}, {verdict}{where}"
    return AnatomyCell(name, (*verdict_color(record), ESTIMATED_ALPHA if record.estimated else 255), text, record)


def export_cells(layout: AnatomyLayout, formats: dict[str, str], predicted: dict[str, float],
                 head_tied: bool) -> dict[str, AnatomyCell]:
    """Each linear in the format the export writes for it; a tied head's table is the embedding's."""
    cells: dict[str, AnatomyCell] = {}
    names = [f"{b}.{c}" for b in layout.blocks for c in layout.columns] + ["head"]
    for name in names:
        fmt = formats.get(name, "fp32")
        figure = predicted.get(name)
        text = f"{name}: {fmt}" + (f", predicted KL {figure:.4g} at the export's format" if figure is not None else "")
        cells[name] = AnatomyCell(name, (*FORMAT_COLORS[fmt], 255), text + " (click to switch)")
    from modeldoctor.export import BLOCK_FORMATS

    table = formats.get("head", "fp32") if head_tied and formats.get("head") in BLOCK_FORMATS else "fp32"
    cells[EMBEDDING] = AnatomyCell(EMBEDDING, (*FORMAT_COLORS[table], 255), f"token embedding: {table}"
                                   + (" (one table shared with the tied head)" if head_tied else ""))
    return cells


def treatment_cells(layout: AnatomyLayout, outcome, threshold: float, kept: set[str]) -> dict[str, AnatomyCell]:
    """A treatment's per-block figures after it, on every linear of the block; linears the
    treatment keeps in fp32 outlined."""
    from modeldoctor.checkup.verdict import severity

    layers = (getattr(outcome, "layers", None) or {}) if outcome is not None else {}
    after = dict(zip(layers.get("targets", []), layers.get("after", [])))
    before = dict(zip(layers.get("targets", []), layers.get("before", [])))
    cells: dict[str, AnatomyCell] = {}
    for block in layout.blocks:
        for column in layout.columns:
            name = f"{block}.{column}"
            value = after.get(str(block))
            kept_text = ", kept in fp32" if name in kept else ""
            if value is None:
                cells[name] = AnatomyCell(name, None, f"{name}: no per-block figure{kept_text}", outlined=name in kept)
            else:
                cells[name] = AnatomyCell(
                    name, (*SEVERITY_COLORS[severity(value, threshold)], 255),
                    f"{name}: block {block} mean KL {before.get(str(block), float('nan')):.4g} → {value:.4g}"
                    f"{kept_text}", outlined=name in kept)
    cells["head"] = AnatomyCell("head", None, "head" + (", kept in fp32" if "head" in kept else ""),
                                outlined="head" in kept)
    cells[EMBEDDING] = AnatomyCell(EMBEDDING, None, "token embedding")
    return cells


def expert_cells(report, block: int) -> HeatCells:
    """One MoE block's modifications x experts (router, experts, shared experts) heatmap from a
    finished report, in the verdict colours of the other heatmap; pairs not probed stay empty."""
    from modeldoctor.checkup.experts import expert_grid, short_expert_label

    rows, columns, _ = expert_grid(report, block)
    cells = HeatCells(np.full((len(rows), len(columns)), np.nan), np.zeros((len(rows), len(columns), 4), np.uint8),
                      rows, [short_expert_label(c) for c in columns])
    for record in report.probes:
        target = record.spec.targets[0] if record.spec.targets and record.spec.mode == "isolated" else ""
        block_of, _, rel = target.partition(".")
        if block_of != str(block) or rel not in columns or record.spec.modification not in rows:
            continue
        at = (rows.index(record.spec.modification), columns.index(rel))
        cells.kl[at] = log_kl(record.score)
        cells.colors[at] = (*verdict_color(record), ESTIMATED_ALPHA if record.estimated else 255)
        cells.records[at] = record
    return cells
