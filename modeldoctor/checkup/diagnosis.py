"""The diagnosis in plain language: which layers bleed under which modification, how badly,
where the model's thresholds lie, and what treatment each finding calls for."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modeldoctor.checkup.experts import routing_findings
from modeldoctor.metrics.divergence import position_curve
from modeldoctor.modifications.base import create
from modeldoctor.report.results import CheckupReport, ProbeRecord

TREATMENTS = {
    "quantize": "keep these layers in higher precision (mixed precision), or rescale their inputs "
                "first (SmoothQuant-style for int8 dynamic, AWQ-style for weight-only int4)",
    "prune": "prune these layers less, or use gradient-aware pruning that protects important weights",
    "structure": "leave these blocks in place; change structure only where the damage is small",
    "decoding": "calibrate the sampling temperature to the model, or decode greedily",
    "lowrank": "keep these layers at full rank or a higher one, or factor them activation-aware (svd-aw) "
               "so the kept directions are the ones the inputs use",
    "routing": "keep the routers in full precision, k as trained, and the experts that carry traffic",
}
SEVERITY_RANK = {"healthy": 0, "mild": 1, "moderate": 2, "severe": 3}


@dataclass(frozen=True)
class Finding:
    title: str
    text: str
    severity: str  # healthy | mild | moderate | severe
    recommendation: str = ""


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0–2, 5'."""
    indices = sorted(set(indices))
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}–{value}")
            start = None
    return ", ".join(parts)


def _targets_text(records: list[ProbeRecord]) -> str:
    if all(r.spec.targets[0].isdigit() for r in records):  # blocks (linears, the head too, are names)
        return "block" + ("s " if len(records) > 1 else " ") + ranges([int(r.spec.targets[0]) for r in records])
    return ", ".join(r.spec.targets[0] for r in records[:8]) + (" …" if len(records) > 8 else "")


def _kinds_text(report: CheckupReport, records: list[ProbeRecord]) -> str:
    """For a hybrid model's bleeding blocks, which mix tokens by attention and which by a
    state-space mixer: ' (state-space (Mamba): 0, 2; attention: 1)'; empty otherwise."""
    kinds = report.model.get("block_kinds") or []
    if report.model.get("kind") != "hybrid" or not all(r.spec.targets[0].isdigit() for r in records):
        return ""
    by_kind: dict[str, list[int]] = {}
    for record in records:
        block = int(record.spec.targets[0])
        if block < len(kinds):
            by_kind.setdefault(kinds[block], []).append(block)
    names = {"state-space": "state-space (Mamba)", "attention": "attention", "none": "MLP-only"}
    return " (" + "; ".join(f"{names.get(k, k)}: {ranges(b)}" for k, b in by_kind.items()) + ")"


def _plan_notes_finding(report: CheckupReport) -> Finding | None:
    """The plan's notes on a state-space or hybrid model: what it left out and why (head pruning on
    Mamba blocks), and what it probed otherwise than asked."""
    notes = report.plan.get("notes") or []
    if report.model.get("kind", "transformer") == "transformer" or not notes:
        return None
    return Finding("Notes on the plan for this model", " ".join(notes), "healthy")


def _worst(records: list[ProbeRecord]) -> str:
    return max((r.severity for r in records), key=SEVERITY_RANK.get, default="healthy")


def diagnose(report: CheckupReport) -> list[Finding]:
    findings: list[Finding] = []
    threshold = report.findings.get("threshold", report.plan.get("threshold", 0.01))
    ref_knowledge = report.reference_knowledge()
    for name in report.modifications():
        isolated = [r for r in report.probes if r.spec.modification == name and r.spec.mode == "isolated"]
        if not isolated:
            continue
        family = isolated[0].spec.family
        bleeding = sorted((r for r in isolated if r.bleeding), key=lambda r: r.score, reverse=True)
        median = float(np.median([r.score for r in isolated]))
        knowledge = [r.metrics["knowledge_accuracy"] for r in isolated if "knowledge_accuracy" in r.metrics]
        if not bleeding:
            text = (f"No layer bleeds: mean KL stays at or below {max(r.score for r in isolated):.3g} nats "
                    f"(threshold {threshold:g}) on all {len(isolated)} probed layers.")
            if family == "structure":
                text += " " + safest_text(isolated, name)
            findings.append(Finding(f"{name}: healthy", text, "healthy"))
            continue
        worst = bleeding[0]
        text = (f"{len(bleeding)} of {len(isolated)} layers bleed: {_targets_text(bleeding)}"
                f"{_kinds_text(report, bleeding)}. "
                f"Worst is {worst.spec.target} (mean KL {worst.score:.3g} nats, top-1 agreement "
                f"{worst.metrics.get('same_top', float('nan')):.0%}, perplexity ×{worst.metrics.get('ppl_ratio', 1):.2f}); "
                f"the median layer's KL is {median:.3g}.")
        guessed = sum(r.estimated for r in bleeding)
        if guessed:  # a cancelled two-stage run can end before its estimates were measured
            text += (f" {guessed} of these verdicts rest on first-stage estimates only, not yet measured "
                     "(resume the checkup, or run it with every probe measured exactly).")
        if knowledge and ref_knowledge:
            low = min(knowledge)
            if low < ref_knowledge - 0.02:
                text += f" Knowledge-probe accuracy falls from {ref_knowledge:.0%} to as low as {low:.0%}."
        if family == "structure":
            text += " " + safest_text(isolated, name)
        findings.append(Finding(f"{name}: {len(bleeding)} bleeding layer{'s' * (len(bleeding) > 1)}", text,
                                _worst(bleeding), _sentence(TREATMENTS[family]) if family in TREATMENTS else ""))
    for name, crossing in report.findings.get("cumulative", {}).items():
        findings.append(Finding(
            f"{name} across the model",
            f"Applied layer after layer, {name} crosses the bleeding line once {crossing['crosses_at']} "
            f"targets are modified (through {crossing['last_target']}).", "moderate",
            "Modify only the layers before that point, or treat the bleeding ones first."))
    for group, curve in report.findings.get("sweeps", {}).items():
        unit = create(curve["modifications"][0]).describe_strength
        if curve["all_safe"]:
            text = f"Every strength tried is safe (down to {unit(curve['strengths'][-1])})."
            level = "healthy"
        else:
            safe = f"safe down to {unit(curve['last_safe'])}" if curve["last_safe"] is not None else "never safe"
            text = (f"Whole model: {safe}; {unit(curve['first_bleeding'])} bleeds "
                    f"(KL {curve['scores'][curve['strengths'].index(curve['first_bleeding'])]:.3g}); "
                    f"the sharpest break (knee) is at {unit(curve['knee'])}.")
            fragile = [int(b) for b, c in curve.get("blocks", {}).items()
                       if c["first_bleeding"] is not None and c["first_bleeding"] == curve["first_bleeding"]]
            if fragile:
                text += f" At {unit(curve['first_bleeding'])} blocks {ranges(fragile)} bleed on their own."
            level = "severe" if curve["last_safe"] is None else "moderate"
        findings.append(Finding(f"Robustness threshold ({group})", text, level,
                                "Stay at or above the last safe strength, or treat the fragile blocks."
                                if level != "healthy" else ""))
    for record in report.by_mode("decoding"):
        m = record.metrics
        findings.append(Finding(
            f"{record.spec.modification}: generations {'diverge' if record.bleeding else 'stay close'}",
            f"{m['token_agreement']:.0%} of greedy tokens kept; first divergence after "
            f"{m['first_divergence']:.1f} tokens on average; trajectory KL {m['kl_trajectory']:.3g}.",
            record.severity, _sentence(TREATMENTS["decoding"]) if record.bleeding else ""))
    plan_notes = _plan_notes_finding(report)
    if plan_notes:
        findings.append(plan_notes)
    call_shapes = _prefill_vs_decode_finding(report)
    if call_shapes:
        findings.append(call_shapes)
    findings += _context_findings(report)
    findings += _whole_model_findings(report)
    findings += _keys_vs_values_findings(report)
    sweep = _long_context_finding(report)
    if sweep:
        findings.append(sweep)
    findings.extend(routing_findings(report, threshold))
    findings.sort(key=lambda f: SEVERITY_RANK[f.severity], reverse=True)
    return findings


def safest(records: list[ProbeRecord], count: int = 3) -> list[ProbeRecord]:
    """The measured probes of one structural change that hurt least, best first."""
    measured = [r for r in records if not r.estimated]
    return sorted(measured, key=lambda r: r.score)[:count]


def safest_text(records: list[ProbeRecord], name: str) -> str:
    best = safest(records)
    if not best:
        return ""
    verb = {"remove": "remove", "duplicate": "duplicate"}.get(name, f"change ({name})")
    listed = ", ".join(f"{r.spec.target} (KL {r.score:.3g})" for r in best)
    if all(r.bleeding for r in best):
        done = {"remove": "removed", "duplicate": "duplicated"}.get(name, "changed")
        return f"No block can be {done} without bleeding; the least harmful: {listed}."
    return f"Safest blocks to {verb}: {listed}" + (" (the later ones bleed too)." if any(r.bleeding for r in best)
                                                    else ".")


def kl_plain_reading(report: CheckupReport, kl: float) -> str | None:
    """What a mean KL means on this model and text, read off the checkup's own measured probes: the
    share of next-token top choices that change in probes near that KL (within a factor of 2)."""
    near = [1 - r.metrics["same_top"] for r in report.probes
            if not r.estimated and "same_top" in r.metrics and r.score > 0 and 0.5 <= r.score / kl <= 2]
    if len(near) < 3:
        return None
    changed = float(np.median(near))
    return (f"at a mean KL of about {kl:.3g} nats, about {changed:.0%} of next-token top choices change "
            f"(median of {len(near)} measured probes of this checkup near that KL)")


PREFILL, DECODE = "int8-dynamic", "int8-dynamic-decode"


def prefill_vs_decode(report: CheckupReport) -> list[dict]:
    """Per linear probed in isolation under both int8 dynamic call shapes: mean KL in a prefill
    call (one activation range per sequence) and in one-token decode calls (one range per
    token), and their ratio prefill / decode; the linears where they differ most come first."""
    by_shape: dict[str, dict[str, ProbeRecord]] = {PREFILL: {}, DECODE: {}}
    for record in report.by_mode("isolated"):
        if record.spec.modification in by_shape and not record.spec.targets[0].isdigit():  # linears, not blocks
            by_shape[record.spec.modification][record.spec.targets[0]] = record
    rows = []
    for linear, prefill in by_shape[PREFILL].items():
        decode = by_shape[DECODE].get(linear)
        if decode is None:
            continue
        ratio = max(prefill.score, 1e-12) / max(decode.score, 1e-12)  # a KL of exactly 0 still orders
        rows.append({"linear": linear, "prefill": prefill.score, "decode": decode.score, "ratio": ratio,
                     "prefill_record": prefill, "decode_record": decode})
    rows.sort(key=lambda row: abs(np.log(row["ratio"])), reverse=True)
    return rows


def _prefill_vs_decode_finding(report: CheckupReport, named: int = 3) -> Finding | None:
    rows = prefill_vs_decode(report)
    if not rows:
        return None
    text = ("Prefill (one activation range per sequence) and one-token decoding (one range per token) "
            "differ most in " + "; ".join(
                f"{row['linear']} (mean KL {row['prefill']:.3g} prefill vs {row['decode']:.3g} decode, "
                f"×{row['ratio']:.2g})" for row in rows[:named]) + ".")
    only_prefill = [r["linear"] for r in rows if r["prefill_record"].bleeding and not r["decode_record"].bleeding]
    only_decode = [r["linear"] for r in rows if r["decode_record"].bleeding and not r["prefill_record"].bleeding]
    for label, names in (("prefill", only_prefill), ("decoding", only_decode)):
        if names:
            text += f" Bleeding in {label} only: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}."
    split = [r for r in rows if r["linear"] in only_prefill + only_decode]
    severity = _worst([r[key] for r in split for key in ("prefill_record", "decode_record")])
    advice = ("A linear that bleeds under one call shape only matters as much as that call shape does in "
              "your use: prefill for long prompts, decoding for long generations.") if split else ""
    return Finding("int8-dynamic: prefill vs decode", text, severity, advice)


CONTEXT_GROWTH = 1.5  # damage at the longest context this many times that at the shortest: say it grows


def context_curves(report: CheckupReport) -> dict[str, dict]:
    """Per modification, its measured isolated probes' mean KL by position bucket (how many
    tokens of context each scored token had), averaged over the probes: {"labels", "starts",
    "kl", "probes", "growth" (last bucket over first)}. Only where two buckets or more were seen."""
    curves = {}
    for name in report.modifications():
        measured = [position_curve(r.metrics) for r in report.probes if r.spec.modification == name
                    and r.spec.mode == "isolated" and not r.estimated]
        measured = [c for c in measured if len(c) >= 2]
        if not measured:
            continue
        labels = [label for label, _, _ in measured[0]]
        starts = [start for _, start, _ in measured[0]]
        kl = [float(np.mean([c[i][2] for c in measured if len(c) > i])) for i in range(len(labels))]
        curves[name] = {"labels": labels, "starts": starts, "kl": kl, "probes": len(measured),
                        "growth": kl[-1] / kl[0] if kl[0] > 0 else float("inf")}
    return curves


def _context_findings(report: CheckupReport) -> list[Finding]:
    findings = []
    for name, curve in context_curves(report).items():
        if max(curve["kl"]) <= 0:
            continue
        steps = ", ".join(f"{kl:.3g} at positions {label}" for label, kl in zip(curve["labels"], curve["kl"]))
        growth = curve["growth"]
        trend = ("grows with context" if growth >= CONTEXT_GROWTH else
                 "shrinks with context" if growth <= 1 / CONTEXT_GROWTH else "does not depend much on context")
        text = (f"Mean KL of {name}'s {curve['probes']} measured probes by how many tokens precede the scored "
                f"token: {steps} (×{growth:.2g} from the first bucket to the last); its damage {trend}.")
        advice = ("Check it on prompts as long as yours (a longer evaluation sequence length), "
                  "since longer contexts bleed more.") if growth >= CONTEXT_GROWTH else ""
        findings.append(Finding(f"{name}: damage by context length", text,
                                "mild" if growth >= CONTEXT_GROWTH else "healthy", advice))
    return findings


def _keys_vs_values_findings(report: CheckupReport) -> list[Finding]:
    """Where a checkup probed a block's cached keys and its cached values apart in the same format
    (k-int4 beside v-int4): which of the two is the fragile one, block by block."""
    findings = []
    isolated = {(r.spec.modification, r.spec.targets[0]): r for r in report.by_mode("isolated") if not r.estimated}
    for name in report.modifications():
        if not name.startswith("k-"):
            continue
        values = "v-" + name[2:]
        blocks = [t for (m, t) in isolated if m == name and (values, t) in isolated]
        if not blocks:
            continue
        keys_worse = [t for t in blocks if isolated[(name, t)].score > 2 * isolated[(values, t)].score]
        values_worse = [t for t in blocks if isolated[(values, t)].score > 2 * isolated[(name, t)].score]
        bleeding = [t for t in blocks if isolated[(name, t)].bleeding or isolated[(values, t)].bleeding]
        worst = max(blocks, key=lambda t: max(isolated[(name, t)].score, isolated[(values, t)].score))
        text = (f"Cached keys ({name}) cost more than twice what cached values ({values}) cost in "
                f"{len(keys_worse)} of {len(blocks)} blocks" + (f" ({ranges([int(t) for t in keys_worse])})"
                                                                  if keys_worse else "")
                + f", values more than twice the keys in {len(values_worse)}"
                + (f" ({ranges([int(t) for t in values_worse])})" if values_worse else "")
                + f". Worst block {worst}: keys {isolated[(name, worst)].score:.3g}, values "
                  f"{isolated[(values, worst)].score:.3g} nats.")
        records = [isolated[(m, t)] for t in bleeding for m in (name, values)]
        findings.append(Finding(f"KV cache in {name[2:]}: keys or values?", text,
                                _worst([r for r in records if r.bleeding]),
                                "Keep the fragile part (keys or values) of the blocks that bleed in higher precision, "
                                "or cache them in more bits." if bleeding else ""))
    return findings


def _whole_model_findings(report: CheckupReport) -> list[Finding]:
    """Probes of a change to the whole model (a RoPE scaling): one finding each."""
    findings = []
    for record in report.by_mode("model"):
        curve = position_curve(record.metrics)
        text = (f"On text within the model's own length it costs a mean KL of {record.score:.3g} nats (top-1 "
                f"agreement {record.metrics.get('same_top', float('nan')):.0%}, perplexity "
                f"×{record.metrics.get('ppl_ratio', 1):.2f})")
        if len(curve) >= 2:
            text += "; by position: " + ", ".join(f"{kl:.3g} at {label}" for label, _, kl in curve)
        findings.append(Finding(f"{record.spec.modification} (whole model)", text + ".",
                                record.severity if record.bleeding else "healthy",
                                "Use it only where prompts exceed the model's length limit; below it the "
                                "unscaled model reads the text as it was trained to." if record.bleeding else ""))
    return findings


def _long_context_finding(report: CheckupReport) -> Finding | None:
    """The long-context probe's result: each modification's KL as the sequence grows."""
    context = report.context
    if not context or not context.get("lengths"):
        return None
    lengths = context["lengths"]
    parts = []
    worst_growth = 1.0
    for name, curve in context["curves"].items():
        kl = curve["kl"]
        if not kl:
            continue
        growth = kl[-1] / kl[0] if kl[0] > 0 else float("inf")
        worst_growth = max(worst_growth, growth)
        parts.append(f"{name}: " + ", ".join(f"{value:.3g}" for value in kl) + f" (×{growth:.2g})")
    speed = ", ".join(f"{rate:.0f}" for rate in context["tokens_per_s"])
    limit = context.get("limit")
    text = (f"Mean KL on the whole model at {', '.join(map(str, lengths))} tokens of {context['text']}: "
            + "; ".join(parts) + f". The original runs {speed} tokens/s at those lengths.")
    if limit:
        reached = max(lengths) >= limit
        text += (f" The model's length limit is {limit} tokens" + (", reached." if reached else
                 f"; the text allowed {context['available_tokens']} (a longer text file reaches it)."))
    grows = worst_growth >= CONTEXT_GROWTH
    title = "Long-context probe: damage grows with length" if grows else \
        "Long-context probe: damage does not grow with length"
    return Finding(title, text, "mild" if grows else "healthy",
                   "Damage grows with length: check it at the prompt lengths you deploy." if grows else "")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def estimate_summary(report) -> list[str]:
    """One sentence per modification of a two-stage checkup: how much was only estimated, and
    how well the estimate agreed with the exact figures where both exist."""
    lines = []
    for name, agreement in report.findings.get("estimate", {}).items():
        line = (f"{name}: {agreement['verified']} probes measured exactly, {agreement['estimated_only']} "
                "estimated only")
        if agreement.get("spearman") is not None:
            miss = agreement["largest_miss"]
            line += (f"; on the measured ones the estimate ranks with Spearman {agreement['spearman']:.2f}, "
                     f"largest miss {miss['target']} (estimated {miss['estimated']:.4f}, measured "
                     f"{miss['measured']:.4f})")
        lines.append(line + ".")
    return lines
