"""How long a checkup takes: before it starts, from one timed forward pass and each planned
probe's cost by position and kind; while it runs, from the probes measured so far, with paused
time left out. Both give a range, not one number: knowledge probes are scored only where a
probe bleeds, and how many quantization estimates need verifying is known only after stage 1."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.report.results import ProbeSpec

DECODING_COST = 8.0  # a decoding probe generates from every prompt: about 8 full passes
GRADIENT_PASSES = 3.0  # stage 1: a forward and a backward pass over the text, per modification


def probe_cost(anatomy, spec: ProbeSpec, prefix_cache: bool) -> float:
    """Relative cost in block-equivalents: a probe re-runs the blocks from its own onwards (with the
    prefix cache) and the head."""
    block_params = sum(m.weight.numel() for m in anatomy.blocks[0].linears.values()) or 1
    head = anatomy.head.weight.numel() / block_params
    if spec.family == "decoding":
        return DECODING_COST * (anatomy.num_blocks + head)
    if spec.mode == "model":  # whole forward passes
        return anatomy.num_blocks + head
    start = spec.block if prefix_cache else 0
    if prefix_cache and spec.mode == "cumulative" and len(spec.targets) > 1:
        start = anatomy.block_of(spec.targets[-1])  # resumes from the previous step's states
    return anatomy.num_blocks - start + head


def knowledge_stage_probes(plan: CheckupPlan, probes: list[ProbeSpec]) -> dict[str, list[ProbeSpec]]:
    """Per modification, the probes a "worst" plan's knowledge stage may score at the end (its
    isolated, non-decoding ones; knowledge_top of them at most); empty for other plans."""
    if not (plan.knowledge and plan.knowledge_on == "worst"):
        return {}
    candidates: dict[str, list[ProbeSpec]] = {}
    for spec in probes:
        if spec.mode == "isolated" and spec.family != "decoding":
            candidates.setdefault(spec.modification, []).append(spec)
    return candidates


def full_pass_cost(anatomy) -> float:
    block_params = sum(m.weight.numel() for m in anatomy.blocks[0].linears.values()) or 1
    return anatomy.num_blocks + anatomy.head.weight.numel() / block_params


@dataclass(frozen=True)
class Duration:
    """A time range in seconds; `low == high` when there is nothing uncertain about it."""

    low: float
    high: float

    @property
    def middle(self) -> float:
        return (self.low + self.high) / 2


def time_forward(model, tokens: int = 256, repeats: int = 2) -> float:
    """Seconds per token of a plain forward pass over one sequence as long as the checkup's (the
    best of `repeats`, after a warm-up): short passes overstate the cost per token."""
    device = next(model.parameters()).device
    ids = torch.randint(10, 100, (1, tokens), device=device)
    best = float("inf")
    with torch.inference_mode():
        model(input_ids=ids[:, :16])
        for _ in range(repeats):
            began = time.perf_counter()
            model(input_ids=ids)
            best = min(best, time.perf_counter() - began)
    return best / tokens


def planned_duration(anatomy, plan: CheckupPlan, probes: list[ProbeSpec], seconds_per_token: float,
                     tokens: int, knowledge_tokens: int, exact_at_least: int) -> Duration:
    """Before the run: the reference pass, stage 1 (if any) and the exact probes. The low end scores
    no knowledge probes and verifies only the fewest estimates; the high end verifies twice as
    many and scores knowledge where the plan may (every exact probe, or the worst few of each
    modification after the probes)."""
    full = full_pass_cost(anatomy)
    per_unit = seconds_per_token / full  # one block-equivalent over one token
    reference = (tokens + (knowledge_tokens if plan.knowledge else 0)) * full * per_unit
    # Knowledge tokens a probe may add as it runs; "worst" scores them in a stage of their own.
    knowledge = knowledge_tokens if plan.knowledge and plan.knowledge_on != "worst" else 0
    from modeldoctor.checkup.run import _estimated_first

    estimated = [p for p in probes if not plan.exhaustive and _estimated_first(p)]
    exact = [p for p in probes if p not in estimated]
    low = high = reference
    if estimated:
        modifications = {p.modification for p in estimated}
        stage1 = (GRADIENT_PASSES * len(modifications) * full + len(estimated)) * tokens * per_unit
        verify = max(exact_at_least - len(exact), 0)
        mean_cost = sum(probe_cost(anatomy, p, plan.prefix_cache) for p in estimated) / len(estimated)
        low += stage1 + verify * mean_cost * tokens * per_unit
        high += stage1 + min(2 * verify, len(estimated)) * mean_cost * (tokens + knowledge) * per_unit
    costs = [probe_cost(anatomy, p, plan.prefix_cache) for p in exact]
    low += sum(costs) * tokens * per_unit
    high += sum(costs) * (tokens + knowledge) * per_unit
    for isolated in knowledge_stage_probes(plan, probes).values():
        mean_cost = sum(probe_cost(anatomy, p, plan.prefix_cache) for p in isolated) / len(isolated)
        high += min(plan.knowledge_top, len(isolated)) * mean_cost * knowledge_tokens * per_unit
    context = context_stage_tokens(plan, tokens) * full * per_unit
    return Duration(low + context, high + context)


def context_stage_tokens(plan: CheckupPlan, eval_tokens: int) -> int:
    """Tokens the long-context probe runs: the original and each modification that applies to the
    whole model, at every length the evaluation text reaches (the model's limit aside)."""
    from modeldoctor.checkup.context import WHOLE_MODEL_MEANINGLESS, usable_lengths
    from modeldoctor.modifications.base import create, expand

    if not plan.context_lengths:
        return 0
    mods = [n for n in expand(plan.modifications) if create(n).family not in WHOLE_MODEL_MEANINGLESS]
    return sum(usable_lengths(plan.context_lengths, eval_tokens, None)) * (1 + len(mods)) if mods else 0


@dataclass
class ProbeClock:
    """The live ETA: seconds per unit of cost, learnt from the probes measured so far (on the
    control's clock, which stops while paused), by kind of probe."""

    rates: dict[str, list[float]] = field(default_factory=dict)

    def observe(self, spec: ProbeSpec, cost: float, seconds: float) -> None:
        if cost > 0:
            self.rates.setdefault(spec.family, []).append(seconds / cost)

    def remaining(self, pending: list[tuple[ProbeSpec, float]]) -> tuple[float | None, Duration | None]:
        """(expected seconds left, its range) for the pending (spec, cost) pairs; None before any
        probe was measured."""
        everything = [r for rates in self.rates.values() for r in rates]
        if not everything:
            return None, None
        expected = low = high = 0.0
        for spec, cost in pending:
            rates = self.rates.get(spec.family) or everything
            expected += cost * statistics.fmean(rates)
            low += cost * min(rates)
            high += cost * max(rates)
        return expected, Duration(low, high)
