"""What a checkup will probe: modifications x targets x scan modes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from modeldoctor.checkup import KNOWLEDGE_TOP
from modeldoctor.checkup.applicability import NO_ATTENTION_NOTE, refusal_notes
from modeldoctor.errors import PlanError
from modeldoctor.model import Anatomy
from modeldoctor.modifications.base import SCOPES, create, expand
from modeldoctor.report.results import ProbeSpec

MODES = ("isolated", "cumulative", "sweep")
KNOWLEDGE_ON = ("worst", "bleeding", "all")
DEFAULT_THRESHOLD = 0.01  # nats of mean KL


@dataclass
class CheckupPlan:
    modifications: list[str] = field(default_factory=lambda: ["int8-dynamic", "int4", "prune-wanda-50", "remove"])
    scope: str = "blocks"  # blocks | linears
    modes: tuple[str, ...] = ("isolated",)
    threshold: float = DEFAULT_THRESHOLD  # bleeding above this mean KL
    outlier_k: float = 5.0  # ... or above median + k * MAD of the same modification's probes
    knowledge: bool = True  # score the knowledge probes ...
    # ... once the probes are measured, on the knowledge_top most damaging bleeding probes of each
    # modification ("worst"); on every probe that bleeds as it is measured ("bleeding"); or on
    # "all". Each scoring costs about as much as the probe's text again, so "worst" says what the
    # damage does to knowledge where it is greatest, without paying for it on every bleeding layer.
    knowledge_on: str = "worst"
    knowledge_top: int = KNOWLEDGE_TOP
    attention: bool = True  # attention disruption for structural probes
    prefix_cache: bool = True
    targets: list[str] | None = None  # restrict to these blocks / linears
    # Two stages: isolated quantization probes are first estimated all at once (checkup.estimate);
    # then those estimated at or above verify_fraction of the threshold, at least the verify_top
    # highest of each modification, and control_sample others drawn at random are measured exactly.
    exhaustive: bool = False  # measure every probe exactly instead
    verify_fraction: float = 0.5
    verify_top: int = 10
    control_sample: int = 3
    # The long-context probe (checkup.context): every modification on the whole model at these
    # sequence lengths of the evaluation text; none: not run.
    context_lengths: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        data = asdict(self)
        data["modes"] = list(self.modes)
        data["context_lengths"] = list(self.context_lengths)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CheckupPlan":
        known = {f.name for f in fields(cls)}  # a file from an older version lacks newer fields
        return cls(**{**{k: v for k, v in data.items() if k in known}, "modes": tuple(data["modes"]),
                      "context_lengths": tuple(data.get("context_lengths", ()))})

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise PlanError(f"Scope must be one of {', '.join(SCOPES)} (got '{self.scope}').")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise PlanError(f"Scan modes must be among {', '.join(MODES)} (got {', '.join(bad) or 'none'}).")
        if not self.modifications:
            raise PlanError("Choose at least one modification.")
        if self.knowledge_on not in KNOWLEDGE_ON:
            raise PlanError(f"Knowledge probes run on one of {', '.join(KNOWLEDGE_ON)} (got '{self.knowledge_on}').")
        if self.verify_top < 0 or self.control_sample < 0 or not self.verify_fraction >= 0 or self.knowledge_top < 0:
            raise PlanError("How many probes to verify must be zero or more.")
        if any(not isinstance(n, int) or n < 2 for n in self.context_lengths):
            raise PlanError("Long-context lengths must be whole numbers of tokens, 2 or more.")
        if not self.threshold > 0:
            raise PlanError("The bleeding threshold must be a positive number of nats.")
        for name in expand(self.modifications):
            create(name)


def scope_targets(anatomy: Anatomy, scope: str, only: list[str] | None = None) -> list[str]:
    """Blocks, or every linear: the block linears and the LM head ("head"), which the export
    quantizes like any other linear; or the experts: each MoE block's router, experts and
    shared experts."""
    every = {"blocks": lambda: [str(b.index) for b in anatomy.blocks], "linears": anatomy.linear_targets,
             "experts": anatomy.expert_targets}[scope]()
    if scope == "experts" and not every:
        raise PlanError("The experts scope needs a mixture-of-experts model; this model has no MoE blocks.")
    if only is None:
        return every
    unknown = [t for t in only if t not in every]
    if unknown:
        raise PlanError(f"No {scope[:-1]} named {', '.join(unknown)} in this model.")
    return [t for t in every if t in set(only)]


def build_probes(plan: CheckupPlan, anatomy: Anatomy) -> tuple[list[ProbeSpec], list[str]]:
    """The ordered probe list, and notes on pairs that were skipped."""
    plan.validate()
    probes: list[ProbeSpec] = []
    skipped: list[str] = []

    def add(name, family, mode, targets, step=None, strength=None):
        block = min((anatomy.block_of(t) for t in targets), default=0)
        probes.append(ProbeSpec(len(probes), name, family, mode, tuple(targets), block, step, strength))

    for name in expand(plan.modifications):
        mod = create(name)
        if mod.family == "decoding":
            add(name, mod.family, "decoding", ())
            continue
        if mod.scopes == ("model",):  # one probe of the whole model
            if mod.applies_to(anatomy, "model"):
                add(name, mod.family, "model", ())
            else:
                skipped.append(f"{name} does not apply to this model: {mod.not_applicable_reason(anatomy)}.")
            continue
        scope = plan.scope if plan.scope in mod.scopes else mod.scopes[0]
        if scope != plan.scope:
            skipped.append(f"{name} works on {scope} only; probed per {scope[:-1]}.")
        candidates = scope_targets(anatomy, scope, plan.targets if scope == plan.scope else None)
        targets = [t for t in candidates if mod.applies_to(anatomy, t)]
        refusals = refusal_notes(mod, anatomy, [t for t in candidates if t not in targets])
        skipped.extend(refusals)
        if not targets:
            if not refusals:
                skipped.append(f"{name} applies to no {scope[:-1]} of this model.")
            continue
        if "isolated" in plan.modes:
            for target in targets:
                add(name, mod.family, "isolated", [target])
        if "cumulative" in plan.modes:
            for k in range(1, len(targets) + 1):
                add(name, mod.family, "cumulative", targets[:k], step=k)
        if "sweep" in plan.modes:
            if mod.sweep_group is None:
                skipped.append(f"{name} has no strength to sweep.")
                continue
            blocks = mod.blocks_it_applies_to(anatomy)
            add(name, mod.family, "sweep-model", blocks, strength=mod.sweep_strength)
            for block in blocks:
                add(name, mod.family, "sweep-block", [block], strength=mod.sweep_strength)
    if plan.attention and not anatomy.blocks_of_kind("attention") and any(p.family == "structure" for p in probes):
        skipped.append(NO_ATTENTION_NOTE)
    if not probes:
        raise PlanError("The plan has nothing to probe: " + " ".join(skipped))
    return probes, skipped
