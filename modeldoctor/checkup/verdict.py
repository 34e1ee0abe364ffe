"""Which probes bleed, how badly, and where the model's robustness breaks (the knee).

A weight or structural probe bleeds when its mean KL exceeds the absolute threshold, or
when it is a robust outlier among probes of the same modification (above median + k*MAD
and at least a quarter of the threshold, so noise on a healthy model is never flagged).
A decoding probe bleeds when fewer than half the greedy tokens survive.
"""

from __future__ import annotations

import math

import numpy as np

from modeldoctor.modifications.base import create
from modeldoctor.report.results import ProbeRecord

SEVERITY_STEPS = ((50.0, "severe"), (5.0, "moderate"), (1.0, "mild"))
DECODING_AGREEMENT_FLOOR = 0.5


def severity(score: float, threshold: float) -> str:
    for factor, name in SEVERITY_STEPS:
        if score >= factor * threshold:
            return name
    return "healthy"


def judge(metrics: dict[str, float], family: str, threshold: float) -> tuple[bool, str, str]:
    """(bleeding, severity, reason) from the probe's own figures."""
    if family == "decoding":
        agreement = metrics["token_agreement"]
        if agreement < DECODING_AGREEMENT_FLOOR:
            level = "severe" if agreement < 0.2 else "moderate"
            return True, level, f"only {agreement:.0%} of greedy tokens kept"
        return False, "healthy", f"{agreement:.0%} of greedy tokens kept"
    kl = metrics["kl_mean"]
    level = severity(kl, threshold)
    if level != "healthy":
        return True, level, f"mean KL {kl:.4g} > threshold {threshold:g}"
    return False, "healthy", f"mean KL {kl:.4g} ≤ threshold {threshold:g}"


def flag_outliers(records: list[ProbeRecord], threshold: float, k: float) -> list[ProbeRecord]:
    """Re-judge isolated probes against their peers (same modification); returns new records."""
    out = list(records)
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        # Estimates count too: a two-stage checkup measures mostly the top of the ranking, whose
        # median and spread alone would call almost nothing an outlier (on the sample, 26 of the
        # 633 linear probes' verdicts then differed from the exhaustive checkup's; 4 with them).
        if rec.spec.mode in ("isolated", "sweep-block") and rec.spec.family != "decoding":
            groups.setdefault(f"{rec.spec.mode}|{rec.spec.modification}", []).append(i)
    for indices in groups.values():
        if len(indices) < 4:
            continue
        scores = np.array([records[i].score for i in indices])
        median = float(np.median(scores))
        mad = float(np.median(np.abs(scores - median))) * 1.4826
        limit = max(median + k * mad, threshold / 4)
        for i in indices:
            rec = records[i]
            if not rec.bleeding and rec.score > limit:
                out[i] = ProbeRecord(**{**rec.__dict__, "bleeding": True, "severity": "mild",
                                        "reason": f"{'estimated ' if rec.estimated else ''}outlier: KL {rec.score:.4g} > "
                                                  f"median + {k:g}·MAD = {limit:.4g}"})
    return out


def knee(strengths: list[float], scores: list[float], threshold: float, descending: bool) -> dict:
    """Robustness threshold of a sweep: the last strength that stays under the threshold,
    the first that crosses it, and the knee (the step where log KL jumps the most)."""
    order = sorted(range(len(strengths)), key=lambda i: strengths[i], reverse=descending)
    xs = [strengths[i] for i in order]
    ys = [scores[i] for i in order]
    safe = [x for x, y in zip(xs, ys) if y <= threshold]
    crossing = next((x for x, y in zip(xs, ys) if y > threshold), None)
    last_safe = None
    for x, y in zip(xs, ys):
        if y > threshold:
            break
        last_safe = x
    jumps = [math.log(max(ys[i + 1], 1e-9)) - math.log(max(ys[i], 1e-9)) for i in range(len(ys) - 1)]
    knee_at = xs[int(np.argmax(jumps)) + 1] if jumps else None
    return {"strengths": xs, "scores": ys, "last_safe": last_safe, "first_bleeding": crossing,
            "knee": knee_at, "all_safe": len(safe) == len(xs)}


def findings(records: list[ProbeRecord], threshold: float) -> dict:
    """Headline results: worst isolated bleeders, cumulative crossings and sweep knees."""
    result: dict = {"threshold": threshold, "worst": [], "cumulative": {}, "sweeps": {}}
    isolated = sorted((r for r in records if r.spec.mode == "isolated"), key=lambda r: r.score, reverse=True)
    result["worst"] = [{"probe": r.spec.label, "kl_mean": r.score, "severity": r.severity}
                       for r in isolated if r.bleeding][:10]
    result["bleeding_count"] = sum(1 for r in records if r.bleeding and r.spec.mode == "isolated")
    result["estimate"] = estimator_agreement(records)
    for rec in records:
        if rec.spec.mode == "cumulative" and rec.bleeding:
            result["cumulative"].setdefault(rec.spec.modification, {"crosses_at": rec.spec.step,
                                                                    "last_target": rec.spec.targets[-1]})
    for group, members in sweep_groups(records, "sweep-model").items():
        if len(members) >= 2:
            # Fewer bits or a lower rank is harsher; more sparsity is harsher.
            descending = create(members[0].spec.modification).sweep_harsher_when_lower
            curve = knee([r.spec.strength for r in members], [r.score for r in members], threshold, descending)
            curve["modifications"] = [r.spec.modification for r in members]
            blocks = {}
            for block_group, block_members in sweep_groups(records, "sweep-block").items():
                if block_group != group:
                    continue
                for target in dict.fromkeys(r.spec.targets[0] for r in block_members):
                    mine = [r for r in block_members if r.spec.targets[0] == target]
                    blocks[target] = knee([r.spec.strength for r in mine], [r.score for r in mine], threshold,
                                          descending)
            curve["blocks"] = blocks
            result["sweeps"][group] = curve
    return result


def sweep_groups(records: list[ProbeRecord], mode: str) -> dict[str, list[ProbeRecord]]:
    """Sweep probes of one mode grouped by the robustness curve they belong to."""
    groups: dict[str, list[ProbeRecord]] = {}
    for rec in records:
        if rec.spec.mode == mode:
            group = create(rec.spec.modification).sweep_group or rec.spec.modification
            groups.setdefault(group, []).append(rec)
    return groups


def estimator_agreement(records: list[ProbeRecord]) -> dict:
    """Per modification of a two-stage checkup: how many probes were only estimated, how many
    were verified, and on the verified ones the estimate's rank agreement with the measured KL
    (Spearman) and its largest miss (the probe whose measured/estimated ratio is farthest from 1)."""
    from modeldoctor.checkup.estimate import ESTIMATOR

    out: dict = {}
    for rec in records:
        estimate = rec.metrics.get("kl_estimated")
        if not rec.estimated and estimate is None:
            continue
        entry = out.setdefault(rec.spec.modification, {"estimated_only": 0, "pairs": []})
        if rec.estimated:
            entry["estimated_only"] += 1
        else:
            entry["pairs"].append((rec.spec.target, estimate, rec.score))
    for entry in out.values():
        pairs = entry.pop("pairs")
        entry["verified"] = len(pairs)
        entry["estimator"] = ESTIMATOR
        if len(pairs) >= 3:
            entry["spearman"] = spearman([p[1] for p in pairs], [p[2] for p in pairs])
        if pairs:
            target, estimate, measured = max(pairs, key=lambda p: abs(math.log(max(p[2], 1e-12) / max(p[1], 1e-12))))
            entry["largest_miss"] = {"target": target, "estimated": estimate, "measured": measured,
                                     "ratio": measured / estimate if estimate > 0 else float("inf")}
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties ranked by order of appearance)."""
    ranks_a = np.argsort(np.argsort(np.asarray(a), kind="stable"), kind="stable")
    ranks_b = np.argsort(np.argsort(np.asarray(b), kind="stable"), kind="stable")
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return float("nan")
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])
