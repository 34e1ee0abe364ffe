"""A mixture of experts' checkup read back from the report: the expert x modification grid of
each MoE block, the experts the evaluation text never uses, and the diagnosis of routing.

Everything here reads the report (the one source of truth), so the CLI, the app's plots and
the diagnosis text say the same thing.
"""

from __future__ import annotations

import numpy as np

from modeldoctor.report.results import CheckupReport, ProbeRecord

FLIP_NOTABLE = 0.05  # a probe that changes the experts of at least 5 % of the tokens is named


def expert_targets(report: CheckupReport) -> set[str]:
    """The experts scope of the model checked: each MoE block's router, experts, shared experts."""
    return set(report.reference.get("expert_targets") or ())


def expert_usage(report: CheckupReport) -> dict[int, np.ndarray]:
    """Block -> the fraction of evaluation tokens each expert receives (each token counts once
    per expert it is sent to, so a block's fractions sum to k)."""
    return {int(b): np.asarray(v, dtype=float) for b, v in (report.reference.get("expert_usage") or {}).items()}


def unused_experts(report: CheckupReport) -> list[tuple[int, int]]:
    """(block, expert index) of every expert that no evaluation token was sent to."""
    return [(block, int(e)) for block, usage in sorted(expert_usage(report).items()) for e in np.flatnonzero(usage == 0)]


def expert_blocks(report: CheckupReport) -> list[int]:
    """The blocks whose experts (or router) were probed one at a time."""
    return sorted({int(r.spec.targets[0].split(".", 1)[0]) for r in _expert_probes(report)})


def _expert_probes(report: CheckupReport) -> list[ProbeRecord]:
    targets = expert_targets(report)
    return [r for r in report.probes if r.spec.mode == "isolated" and r.spec.targets and r.spec.targets[0] in targets]


def expert_grid(report: CheckupReport, block: int) -> tuple[list[str], list[str], np.ndarray]:
    """One MoE block's modification x target grid of mean KL: the modifications (rows), the
    targets (columns, as in the experts scope: router, experts, shared experts, without the
    block prefix) and the matrix (NaN where that pair was not probed)."""
    probes = [r for r in _expert_probes(report) if r.spec.targets[0].split(".", 1)[0] == str(block)]
    rows = list(dict.fromkeys(r.spec.modification for r in probes))
    columns = list(dict.fromkeys(r.spec.targets[0].split(".", 1)[1] for r in probes))
    grid = np.full((len(rows), len(columns)), np.nan)
    for r in probes:
        grid[rows.index(r.spec.modification), columns.index(r.spec.targets[0].split(".", 1)[1])] = r.score
    return rows, columns, grid


def short_expert_label(name: str) -> str:
    """'mlp.experts.5' -> 'e5', 'mlp.gate' -> 'router', 'mlp.shared_expert' -> 'shared'."""
    parts = name.split(".")
    if parts[-1].isdigit():
        return f"e{parts[-1]}"
    return "shared" if "shared" in parts[-1] else "router" if len(parts) > 1 and "gate" in parts[-1] else parts[-1]


def routing_probes(report: CheckupReport) -> list[ProbeRecord]:
    """Measured probes with a routing flip rate, most flips first."""
    found = [r for r in report.probes if "routing_flip_rate" in r.metrics and not r.estimated]
    return sorted(found, key=lambda r: r.metrics["routing_flip_rate"], reverse=True)


def routing_findings(report: CheckupReport, threshold: float) -> list:
    from modeldoctor.checkup.diagnosis import Finding, ranges

    findings = []
    unused = unused_experts(report)
    if unused:
        by_block: dict[int, list[int]] = {}
        for block, expert in unused:
            by_block.setdefault(block, []).append(expert)
        where = "; ".join(f"block {b}: expert{'s' * (len(e) > 1)} {ranges(e)}" for b, e in by_block.items())
        findings.append(Finding(
            f"{len(unused)} expert{'s' * (len(unused) > 1)} never used",
            f"No token of the evaluation text was routed to {where}. Quantizing or pruning "
            f"{'them' if len(unused) > 1 else 'it'} changes nothing on this text.", "mild",
            "Check on text like your deployment's before removing them; until then they are the "
            "safest place for the lowest precision."))
    flips = [r for r in routing_probes(report) if r.spec.mode == "isolated"
             and r.metrics["routing_flip_rate"] >= FLIP_NOTABLE]
    if flips:
        named = ", ".join(f"{r.spec.label} {r.metrics['routing_flip_rate']:.0%} (KL {r.score:.3g})" for r in flips[:4])
        worst = max(flips[:4], key=lambda r: r.score)
        level = "moderate" if worst.score > threshold else "mild"
        findings.append(Finding(
            "Routing changes",
            f"{len(flips)} probe{'s' * (len(flips) > 1)} send at least {FLIP_NOTABLE:.0%} of the tokens to other "
            f"experts in some MoE block; most: {named}. A changed route changes the block's output far more "
            "than a small weight error does.", level,
            "Keep the routers (tiny linears) in full precision, keep k as trained, and keep the experts "
            "whose probes bleed in higher precision (mixed precision per expert)."))
    fragile = sorted((r for r in _expert_probes(report) if r.bleeding and ".experts." in r.spec.targets[0]),
                     key=lambda r: r.score, reverse=True)
    if fragile:
        named = ", ".join(f"{r.spec.targets[0]} under {r.spec.modification} (KL {r.score:.3g})" for r in fragile[:5])
        findings.append(Finding(
            f"{len(fragile)} fragile expert probe{'s' * (len(fragile) > 1)}",
            f"Modified alone, these experts bleed: {named}.", max((r.severity for r in fragile),
                                                                     key=("healthy", "mild", "moderate", "severe").index),
            "Keep these experts (all their linears) in higher precision."))
    return findings
