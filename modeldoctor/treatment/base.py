"""Treatments: what they are given, what they report, how they measure, and their registry.

A treatment is a small object registered under a short name (the name the CLI accepts and
the app lists). Its `run` is a generator of events that ends by returning an Outcome with
whole-model figures before and after, per-layer bars before and after on the same axes,
and whether it was applied (a treatment that makes the deployed model worse on held-out
text is rolled back and says so).

Every fit uses the calibration split; every choice (roll-back, keep list, best method,
prompt or temperature) is made on the selection split; every figure it reports is measured
on the evaluation split, against the untreated model. No choice ever sees the evaluation split.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.errors import PlanError
from modeldoctor.events import Event, Progress
from modeldoctor.model.anatomy import HEAD
from modeldoctor.modifications.base import create
from modeldoctor.report.results import ProbeSpec, _atomic_write, _json_safe
from modeldoctor.session import Session

# The figures a before/after table shows, in order, with how to print them.
FIGURES = {"kl_mean": ("mean KL", "{:.4f}"), "kl_p99": ("KL p99", "{:.3f}"), "same_top": ("top-1 agreement", "{:.1%}"),
           "ppl": ("perplexity", "{:.3f}"), "knowledge_accuracy": ("knowledge probes", "{:.1%}")}


@dataclass
class TreatmentPlan:
    treatments: list[str]  # registered names, applied in this order
    target: str = "int8-dynamic"  # the deployment modification being treated ("none": the model as it is)
    budget: float = 0.10  # mixed precision: fraction of block-linear weights that may stay in fp32
    sparsity: float = 0.5  # gradient-aware pruning
    pattern: str = "unstructured"  # or "2of4"
    decoding: str = "decode-sample"  # the user's decoding settings, for sequence-level divergence
    threshold: float = 0.01  # bleeding line on the per-layer bars

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if not self.treatments:
            raise PlanError("Choose at least one treatment.")
        for name in self.treatments:
            get(name)
        target = create(self.target)
        if target.family not in ("quantize", "none"):
            raise PlanError(f"Treatments work on a quantization (or 'none'), not on {self.target}: "
                            "prune with the gradient-aware treatment instead.")
        if not 0 < self.budget < 1:
            raise PlanError("The mixed-precision budget must be a fraction between 0 and 1 (0.10 is 10 %).")
        if not 0 < self.sparsity < 1:
            raise PlanError("The pruning sparsity must be between 0 and 1 (0.5 is 50 %).")
        if self.pattern not in ("unstructured", "2of4"):
            raise PlanError("The pruning pattern must be 'unstructured' or '2of4'.")
        if create(self.decoding).family != "decoding":
            raise PlanError(f"{self.decoding} is not a decoding setting (see 'modeldoctor modifications').")
        for name in self.treatments:
            get(name).check(self)


@dataclass
class Outcome:
    name: str
    title: str
    deployment: str  # what the figures measure, in words
    before: dict[str, float]
    after: dict[str, float]
    applied: bool
    verdict: str  # one sentence: improved / rejected and why
    summary: str = ""  # a short line for the treated model's history
    layers: dict = field(default_factory=dict)  # {"modification", "targets", "before", "after"}
    table: list[dict] = field(default_factory=list)  # extra comparison rows, e.g. pruning methods
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class TreatmentReport:
    model: dict
    plan: dict
    data: dict
    reference: dict
    outcomes: list[Outcome] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    status: str = "running"
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "treatment.json"
        _atomic_write(path, json.dumps(self.to_dict(), indent=1))
        return path


class Treatment:
    name = ""
    title = ""
    summary = ""
    order = 0  # where it is listed: the order in which treatments compose best
    def check(self, plan: TreatmentPlan) -> None:
        """Raise PlanError when this treatment cannot treat the plan's target."""

    def units(self, session: Session, plan: TreatmentPlan) -> int:
        """Measurement passes this treatment will make, for the progress bar and ETA."""
        return 1

    def run(self, job: "Job") -> Iterator[Event]:
        raise NotImplementedError


_REGISTRY: dict[str, Treatment] = {}


def register(treatment: type[Treatment]) -> type[Treatment]:
    _REGISTRY[treatment.name] = treatment()
    return treatment


def get(name: str) -> Treatment:
    _load_builtin()
    if name not in _REGISTRY:
        raise PlanError(f"Unknown treatment '{name}'. Known: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def treatments() -> list[Treatment]:
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda t: t.order)


def _load_builtin() -> None:
    # Importing the modules registers their treatments (one file per mitigation).
    from modeldoctor.treatment import decoding, knowledge, mixed, pruning, scaling  # noqa: F401


# ---- measuring ------------------------------------------------------------------------------

class Job:
    """What a treatment works with: the session, the three splits, the plan, and a progress clock.
    `data` (evaluation) is for reported figures, `selection` for choices, `calibration` for fits."""

    def __init__(self, session: Session, data: EvalData, plan: TreatmentPlan, control: RunControl,
                 total_units: int) -> None:
        self.session, self.data, self.plan, self.control = session, data, plan, control
        self.calibration = data.calibration_view()
        self.selection = data.selection_view()
        self.total_units, self.done_units = max(total_units, 1), 0
        self.began = time.monotonic()
        self.stage = ""
        # Treatments in a row measure the same deployment (one's "after" is the next one's
        # "before"): a measurement is reused while the weights have not changed since.
        self._measured: dict[tuple, object] = {}

    # Progress -----------------------------------------------------------------------------
    def tick(self, units: int = 1) -> Progress:
        self.done_units = min(self.done_units + units, self.total_units)
        elapsed = time.monotonic() - self.began
        eta = elapsed / self.done_units * (self.total_units - self.done_units) if self.done_units else None
        return Progress(self.done_units, self.total_units, elapsed, eta, self.stage)

    def enter(self, stage: str) -> Progress:
        """Name the stage now starting (yield the result, so the app shows it at once, not when the
        stage's first unit is done)."""
        self.stage = stage
        return self.tick(0)

    def track(self, steps, units: int, what: str):
        """Drive a generator of (done, total) steps, spreading `units` of progress over them and
        yielding a Progress for each step (a heartbeat even when no unit is complete);
        returns the generator's value."""
        spent, stage = 0, self.stage
        while True:
            try:
                done, total = next(steps)
            except StopIteration as finished:
                if units > spent:
                    yield self.tick(units - spent)
                self.stage = stage
                return finished.value
            due = min(units, done * units // max(total, 1))
            self.stage = f"{stage}: {done} of {total} {what}"
            yield self.tick(due - spent)
            spent = due

    # Figures --------------------------------------------------------------------------------
    def kept_for(self, modification: str) -> list[str]:
        """Linears that mixed precision keeps in fp32 when `modification` is deployed."""
        state = self.session.treatment
        return list(state.keep) if state.keep_for == modification else []

    @property
    def all_blocks(self) -> list[str]:
        return [str(b.index) for b in self.session.anatomy.blocks]

    def deployment_targets(self, modification: str) -> list[str]:
        """Where the deployment changes the model: every block, and for a quantization also the
        LM head, as the export quantizes it, unless the head is tied to the embedding (a tied
        head stays fp32 at no cost, see the export). Pruning treats block linears only."""
        anatomy = self.session.anatomy
        mod = create(modification)
        quantizes_head = mod.family == "quantize" and not anatomy.head_tied and mod.applies_to(anatomy, HEAD)
        head = [HEAD] if quantizes_head else []
        return self.all_blocks + head

    def whole_model(self, modification: str, keep: list[str] | None = None, temperature: float | None = None,
                    on: EvalData | None = None, knowledge: bool = True) -> dict[str, float]:
        """The deployed model (treated weights + the modification on every block, `keep`
        left in fp32, logits divided by `temperature`) against the untreated reference, on
        `on` (default: the evaluation split)."""
        data = on or self.data
        state = self.session.treatment
        keep = self.kept_for(modification) if keep is None else keep
        temperature = (state.temperature if state.temperature_for == modification else 1.0) \
            if temperature is None else temperature
        spec = ProbeSpec(0, modification, create(modification).family, "sweep-model",
                         tuple(self.deployment_targets(modification)), 0)
        record = self._measure(data, spec, frozenset(keep), temperature, knowledge, prefix_cache=False)
        return dict(record.metrics)

    @contextlib.contextmanager
    def deployed(self, modification: str, keep: list[str] | None = None):
        """The treated model with the modification on every block (`keep` left in fp32). Yields
        the modification's context: padded batches run under `token_mask(ctx, mask)`."""
        mod = create(modification)
        keep = self.kept_for(modification) if keep is None else keep
        ctx = self.session.mod_context(self.data, mod.needs_input_norms, self.control, mod.needs_gradients,
                                       frozenset(keep))
        with mod.applied(ctx, self.deployment_targets(modification)):
            yield ctx

    def choice_kl(self, modification: str, keep: list[str] | None = None, temperature: float | None = None) -> float:
        """Mean KL of a deployment on the selection split: what choices compare."""
        return self.whole_model(modification, keep, temperature, on=self.selection, knowledge=False)["kl_mean"]

    def isolated(self, modification: str, targets: list[str], keep: list[str] | None = None,
                 on: EvalData | None = None) -> Iterator[Event | float]:
        """Per-layer mean KL of the modification on each target alone, on the model as treated.
        Yields Progress events and, for each target, its score (a float)."""
        data = on or self.data
        keep = frozenset(self.kept_for(modification) if keep is None else keep)
        family = create(modification).family
        # A treated model whose float function changed (pruned) must be rerun from the start.
        prefix = self.session.treatment.function_preserving
        for number, target in enumerate(targets):
            self.control.checkpoint()
            block = self.session.anatomy.block_of(target)
            spec = ProbeSpec(number, modification, family, "isolated", (target,), block)
            record = self._measure(data, spec, keep, 1.0, knowledge=False, prefix_cache=prefix)
            yield record.score
            yield self.tick()

    def _measure(self, data: EvalData, spec: ProbeSpec, keep: frozenset[str], temperature: float,
                 knowledge: bool, prefix_cache: bool):
        from modeldoctor.checkup.run import measure

        knowledge = knowledge and bool(data.knowledge_batches)
        key = (self.session.weights_version, data.spec, spec.modification, spec.mode, spec.targets, keep,
               temperature, knowledge)
        if key not in self._measured:
            ref = self.session.reference(data, self.control)
            plan = CheckupPlan(modifications=[spec.modification], threshold=self.plan.threshold,
                               knowledge=knowledge, knowledge_on="all", attention=False,
                               prefix_cache=prefix_cache)
            self._measured[key] = measure(self.session, ref, data, plan, spec, self.control, keep=keep,
                                          temperature=temperature)
        return self._measured[key]


def collect(events: Iterator[Event | float], into: list[float]) -> Iterator[Event]:
    """Pass events on, put the numbers a measuring generator yields into `into`."""
    for item in events:
        if isinstance(item, float):
            into.append(item)
        else:
            yield item


def figures_text(before: dict, after: dict, keys=("kl_mean", "same_top", "ppl")) -> str:
    parts = []
    for key in keys:
        if key in before and key in after:
            label, fmt = FIGURES[key]
            parts.append(f"{label} {fmt.format(before[key])} → {fmt.format(after[key])}")
    return ", ".join(parts)


def rollback_point(session: Session) -> Callable[[], None]:
    """Remember the model's weights and the treatment choices; the returned function puts both back."""
    weights = session.snapshot_parameters()
    choices = session.treatment.choices()
    had_original = session.treatment.original is not None

    def rollback() -> None:
        session.load_parameters(weights)
        session.treatment.restore_choices(choices)
        session.weights_changed(True)
        if not had_original:
            session.treatment.original, session.treatment.original_digest = None, None
    return rollback
