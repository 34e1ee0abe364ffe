"""Mixed-precision fallback under a budget: which linears stay in fp32.

Which linears to keep is a choice, so it is made on the selection split: each block linear's
isolated KL under the target quantization is measured there, an exact 0/1 knapsack keeps in
fp32 the set of linears that removes the most KL within the budget (a fraction of the block
linears' weights), and the plan is rejected if the deployed model gets no better on the
selection split. The figures it reports are the evaluation split's.
"""

from __future__ import annotations

import math
from functools import reduce

from modeldoctor.errors import PlanError
from modeldoctor.model.anatomy import HEAD
from modeldoctor.modifications.base import create, target_linears
from modeldoctor.treatment.base import Outcome, Treatment, collect, figures_text, register

MAX_KNAPSACK_CELLS = 20_000_000  # past this the greedy bleed-per-weight choice is used


def weight_bits(modification: str) -> float:
    """Stored bits per weight, group scales (and zero points) included."""
    mod = create(modification)
    if not hasattr(mod, "bits"):
        return 8.0  # int8-dynamic: one scale per tensor
    overhead = (16 + (0 if mod.symmetric else 16)) / mod.group if mod.group else 0.0
    return mod.bits + overhead


def choose_kept(scores: dict[str, float], sizes: dict[str, int], capacity: int) -> list[str]:
    """The linears to keep whose summed score is largest with summed size ≤ capacity: an
    exact knapsack over sizes in units of their greatest common divisor (linears come in a
    few shapes), or greedy by score per weight when the table would be too large."""
    names = [n for n in scores if scores[n] > 0 and sizes[n] <= capacity]
    if not names:
        return []
    unit = reduce(math.gcd, (sizes[n] for n in names))
    weights = [sizes[n] // unit for n in names]
    slots = capacity // unit
    if len(names) * (slots + 1) > MAX_KNAPSACK_CELLS:
        chosen, used = [], 0
        for name in sorted(names, key=lambda n: scores[n] / sizes[n], reverse=True):
            if used + sizes[name] <= capacity:
                chosen.append(name)
                used += sizes[name]
        return chosen
    best = [0.0] * (slots + 1)
    took = [[False] * (slots + 1) for _ in names]
    for i, (name, weight) in enumerate(zip(names, weights)):
        value = scores[name]
        for room in range(slots, weight - 1, -1):
            if best[room - weight] + value > best[room]:
                best[room] = best[room - weight] + value
                took[i][room] = True
    chosen, room = [], slots
    for i in range(len(names) - 1, -1, -1):
        if took[i][room]:
            chosen.append(names[i])
            room -= weights[i]
    return chosen[::-1]


def keep_units(anatomy) -> list[str]:
    """What mixed precision keeps or quantizes as one: each block linear, except that an expert
    of a mixture of experts (router-chosen MLP) is kept whole, all its linears in one precision.
    An expert's linears only run together, on the same routed tokens, so they are probed and
    kept together: one probe per expert instead of three, and a keep list that names experts."""
    whole = {n: t for t in anatomy.expert_targets() for n in (anatomy.expert_linears(t) or ())}
    return list(dict.fromkeys(whole.get(n, n) for n in anatomy.linear_names()))


@register
class MixedPrecision(Treatment):
    name = "mixed-precision"
    order = 3
    title = "Mixed precision under a budget"
    summary = ("keeps in fp32 the linears whose quantization costs most, as many as the budget allows "
               "(exact knapsack on selection-text scores), kept only if it helps there; figures on held-out text")

    def check(self, plan):
        if plan.target == "none":
            raise PlanError("Mixed precision needs a quantization to treat (int8-dynamic, int4, …).")

    def units(self, session, plan):
        return len(keep_units(session.anatomy)) + 2 * session.anatomy.num_blocks + 4

    def run(self, job):
        session, plan = job.session, job.plan
        anatomy = session.anatomy
        # Candidates: every linear the deployment quantizes (an untied LM head included), experts whole.
        linears = keep_units(anatomy) + [t for t in job.deployment_targets(plan.target) if t == HEAD]
        sizes = {n: sum(int(anatomy.linear(x).weight.numel()) for x in target_linears(anatomy, n)) for n in linears}
        total = sum(sizes.values())
        yield job.enter(f"mixed precision: {plan.target} on each linear (selection text)")
        values: list[float] = []
        yield from collect(job.isolated(plan.target, linears, keep=[], on=job.selection), values)
        scores = dict(zip(linears, values))
        units = choose_kept(scores, sizes, int(plan.budget * total))
        chosen = [n for unit in units for n in target_linears(anatomy, unit)]  # keep lists name linears
        kept_weights = sum(sizes[n] for n in units)
        bits = weight_bits(plan.target)
        effective = (bits * (total - kept_weights) + 32 * kept_weights) / total
        current = job.kept_for(plan.target)
        yield job.enter("mixed precision: checking the plan on selection text")
        choice_before = job.choice_kl(plan.target, keep=current)
        yield job.tick()
        choice_after = job.choice_kl(plan.target, keep=chosen)
        yield job.tick()
        yield job.enter("mixed precision: held-out figures")
        before = job.whole_model(plan.target, keep=current)
        yield job.tick()
        after = job.whole_model(plan.target, keep=chosen)
        yield job.tick()
        blocks = job.all_blocks
        before_layers: list[float] = []
        after_layers: list[float] = []
        yield from collect(job.isolated(plan.target, blocks, keep=current), before_layers)
        yield from collect(job.isolated(plan.target, blocks, keep=chosen), after_layers)
        applied = bool(chosen) and choice_after < choice_before
        share = kept_weights / total
        if applied:
            session.treatment.keep, session.treatment.keep_for = list(chosen), plan.target
            experts = [u for u in units if anatomy.expert_linears(u) is not None]
            verdict = (f"{len(chosen)} linears kept in fp32" + (f" ({len(experts)} whole experts)" if experts else "")
                       + f" ({share:.1%} of block weights, {effective:.2f} "
                       f"effective bits): {figures_text(before, after)}.")
        else:
            verdict = ("Rejected: " + ("no linear fits the budget" if not chosen else
                                       f"keeping {len(chosen)} linears in fp32 does not improve {plan.target} on "
                                       f"the selection text (mean KL {choice_before:.4f} → {choice_after:.4f})") +
                       "; the previous plan stands.")
        return Outcome(
            name=self.name, title=f"{self.title} for {plan.target} ({plan.budget:.0%} of weights)",
            deployment=f"{plan.target} on every block", before=before, after=after, applied=applied,
            verdict=verdict, summary=f"{len(chosen)} linears kept in fp32 for {plan.target} ({share:.0%} of weights)",
            layers={"modification": plan.target, "targets": blocks, "before": before_layers, "after": after_layers},
            table=[{"linear": n, "selection_kl": scores[n], "weights": sizes[n]} for n in
                   sorted(units, key=scores.get, reverse=True)],
            details={"kept": chosen, "kept_share": share, "effective_bits": effective, "weight_bits": bits,
                     "budget": plan.budget, "scores": scores,
                     "selection_kl": {"before": choice_before, "after": choice_after}})
