"""Which treatments a checkup's findings call for, with the reason in words."""

from __future__ import annotations

import re
from dataclasses import dataclass

from modeldoctor.checkup.diagnosis import ranges
from modeldoctor.report.results import CheckupReport


@dataclass(frozen=True)
class Recommendation:
    target: str  # the modification to treat ("none" for pruning, which the treatment applies itself)
    treatments: tuple[str, ...]
    reason: str
    sparsity: float | None = None


def _where(records) -> str:
    if all(r.spec.targets[0].isdigit() for r in records):  # blocks (linears, the head too, are names)
        return "blocks " + ranges([int(r.spec.targets[0]) for r in records])
    names = [r.spec.targets[0] for r in records]
    return ", ".join(names[:4]) + (" …" if len(names) > 4 else "")


def recommend(report: CheckupReport) -> list[Recommendation]:
    out: list[Recommendation] = []
    ref_knowledge = report.reference_knowledge()
    for name in report.modifications():
        isolated = [r for r in report.probes if r.spec.modification == name and r.spec.mode == "isolated"]
        bleeding = sorted((r for r in isolated if r.bleeding), key=lambda r: r.score, reverse=True)
        if not bleeding:
            continue
        family = bleeding[0].spec.family
        where = _where(bleeding)
        if family == "quantize":
            scaling = "smoothquant" if name.startswith("int8-dynamic") else "awq"  # prefill or decode calls
            label = "smoothing (SmoothQuant)" if scaling == "smoothquant" else "AWQ scaling"
            treatments = [scaling, "mixed-precision"]
            knowledge = [r.metrics.get("knowledge_accuracy") for r in isolated]
            lost = ref_knowledge and any(k is not None and k < ref_knowledge - 0.05 for k in knowledge)
            if lost:
                treatments.append("recovery-prompts")
            out.append(Recommendation(name, tuple(treatments),
                                      f"{name} bleeds in {where} → {label}, else keep them in fp32 (mixed precision)"
                                      + ("; knowledge drops → recovery prompts" if lost else "")))
        elif family == "prune":
            match = re.fullmatch(r"prune-(?:mag|wanda|grad)-(\d+)(?:-a[0-9.]+)?", name)
            if match:
                out.append(Recommendation("none", ("prune-grad",),
                                          f"{name} bleeds in {where} → gradient-aware pruning at the same sparsity",
                                          int(match[1]) / 100))
    decoding = [r for r in report.by_mode("decoding") if r.bleeding]
    if decoding:
        names = ", ".join(r.spec.modification for r in decoding)
        out.append(Recommendation("none", ("calibrate-temperature",),
                                  f"generations drift under {names} → calibrate the temperature"))
    return out
