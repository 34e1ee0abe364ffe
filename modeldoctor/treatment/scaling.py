"""Activation-aware scaling, folded into the model so its float function is unchanged.

For a group of linears that read the same input x (q/k/v after the attention norm, gate/up
after the MLP norm, down after the gated product), x is divided per channel by s and the
linears' input columns multiplied by s; 1/s is folded into whatever produces x (the norm's
weight, or the rows of the MLP's linear factor). SmoothQuant picks s to move activation
outliers into the weights before int8 dynamic quantization; AWQ picks s to protect the
weight columns that see large activations before weight-only int4.

The groups are found by watching a forward pass (which norm output feeds which linear, which
MLP linear scales the down projection's input linearly), not by names per family, and every
fold is checked: a block whose output changes is put back as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.errors import PlanError
from modeldoctor.model.anatomy import weight_matrix
from modeldoctor.modifications.base import create
from modeldoctor.modifications.quantize import ort_dynamic_quantize_activation, ort_int8_weight, quantize_rtn
from modeldoctor.treatment.base import Outcome, Treatment, collect, figures_text, register, rollback_point

FOLD_TOLERANCE = 1e-4  # relative change of a block's output that still counts as unchanged
ALPHAS = tuple(a / 10 for a in range(0, 10))


@dataclass
class ScaleGroup:
    block: int
    consumers: list[str]  # linear names ("3.mlp.gate_proj")
    producer_kind: str  # "norm" or "rows"
    producer: str  # norm module name relative to the block, or a linear name for "rows"


def _block_modules(anatomy, index):
    block = anatomy.blocks[index].module
    return {name: m for name, m in block.named_modules() if name}


def find_scale_groups(session, batch) -> list[ScaleGroup]:
    anatomy = session.anatomy
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for part in anatomy.blocks:
        for name in part.norms:
            module = part.module.get_submodule(name)
            handles.append(module.register_forward_hook(
                lambda m, a, o, key=(part.index, name): outputs.__setitem__(key, o)))
        for rel, module in part.linears.items():
            handles.append(module.register_forward_pre_hook(
                lambda m, a, key=f"{part.index}.{rel}": inputs.__setitem__(key, a[0])))
    try:
        with torch.inference_mode():
            session.model(input_ids=batch.input_ids[:1, :32], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    groups = []
    for part in anatomy.blocks:
        for name in part.norms:
            out = outputs.get((part.index, name))
            consumers = [f"{part.index}.{rel}" for rel in part.linears if inputs.get(f"{part.index}.{rel}") is out]
            if consumers:
                groups.append(ScaleGroup(part.index, consumers, "norm", name))
        if part.mlp_down and part.mlp_name:  # the factor search runs the MLP module alone
            factor = _linear_factor(session, part)
            if factor:
                groups.append(ScaleGroup(part.index, [f"{part.index}.{part.mlp_down}"], "rows", factor))
    return groups


def _linear_factor(session, part) -> str | None:
    """The MLP linear whose output multiplies the down projection's input channel by channel
    (up_proj in gated MLPs): doubling one of its rows doubles that input channel only."""
    mlp = part.module.get_submodule(part.mlp_name)
    down = part.linears[part.mlp_down]
    captured = []
    x = torch.randn(1, 4, session.anatomy.hidden_size, generator=torch.Generator().manual_seed(0))
    handle = down.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    try:
        with torch.inference_mode():
            mlp(x)
            for rel, linear in part.linears.items():
                if not rel.startswith(part.mlp_name + ".") or rel == part.mlp_down:
                    continue
                weight = weight_matrix(linear)
                if weight.shape[0] != captured[0].shape[-1]:
                    continue
                saved = weight[0].clone()
                weight[0] *= 2
                mlp(x)
                weight[0].copy_(saved)
                base, doubled = captured[0], captured[-1]
                if torch.allclose(doubled[..., 0], 2 * base[..., 0], rtol=1e-4, atol=1e-6) and \
                        torch.allclose(doubled[..., 1:], base[..., 1:], rtol=1e-5, atol=1e-7):
                    return f"{part.index}.{rel}"
    finally:
        handle.remove()
    return None


@dataclass
class GroupInputs:
    """Calibration inputs of one scale group, (sequences, tokens, features) right-padded with
    zeros, and which positions are real tokens (sequences, tokens)."""

    x: torch.Tensor
    valid: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        return self.x[self.valid]


def collect_inputs(session, groups: list[ScaleGroup], data: EvalData,
                   control: RunControl | None = None) -> dict[int, GroupInputs]:
    """Calibration inputs of each group; batches of any width, padding marked, never counted."""
    control = control or RunControl()
    anatomy = session.anatomy
    gathered: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(groups))}
    masks: list[torch.Tensor] = []
    handles = []
    for i, group in enumerate(groups):
        handles.append(anatomy.linear(group.consumers[0]).register_forward_pre_hook(
            lambda m, a, i=i: gathered[i].append(a[0].detach().float())))
    try:
        for batch in data.calibration_batches:
            control.checkpoint()
            masks.append(batch.attention_mask.bool())
            with torch.inference_mode():
                session.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not masks:
        return {}
    width = max(m.shape[1] for m in masks)
    valid = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
    return {i: GroupInputs(torch.cat([torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[1])) for c in chunks]),
                           valid)
            for i, chunks in gathered.items() if len(chunks) == len(masks)}


def _weights(session, group: ScaleGroup) -> list[torch.Tensor]:
    return [weight_matrix(session.anatomy.linear(n)).detach().float() for n in group.consumers]


def smoothquant_scales(inputs: GroupInputs, weights: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """SmoothQuant: s = max|x|^a / max|W|^(1-a), a searched to minimise the int8-dynamic error
    of the group's outputs (as onnxruntime computes them: one activation range per sequence's
    real tokens, a prefill call). Returns (s, a); a = -1: no scaling."""
    x, valid = inputs.x, inputs.valid
    x_max = inputs.rows.abs().amax(0).clamp(min=1e-5)
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    exact = [inputs.rows @ w.t() for w in weights]

    def error(s: torch.Tensor) -> float:
        xq = ort_dynamic_quantize_activation(x / s, valid=valid)[valid]
        return sum(float(((xq @ ort_int8_weight(w * s).t()) - y).pow(2).sum()) for w, y in zip(weights, exact))

    best_s, best_a, best = torch.ones_like(x_max), -1.0, error(torch.ones_like(x_max))
    for alpha in ALPHAS[1:]:
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-4)
        e = error(s)
        if e < best:
            best_s, best_a, best = s, alpha, e
    return best_s, best_a


def awq_scales(inputs: GroupInputs, weights: list[torch.Tensor], bits: int, group: int | None,
               symmetric: bool) -> tuple[torch.Tensor, float]:
    """AWQ: s = mean|x|^a (normalised), a searched to minimise the weight-only quantization
    error of the group's outputs over the real tokens. a = 0 is no scaling."""
    flat = inputs.rows
    x_mean = flat.abs().mean(0).clamp(min=1e-5)
    exact = [flat @ w.t() for w in weights]
    best_s, best_a, best = torch.ones_like(x_mean), 0.0, None
    for alpha in ALPHAS:
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        e = sum(float(((flat / s) @ quantize_rtn(w * s, bits, group, symmetric).t() - y).pow(2).sum())
                for w, y in zip(weights, exact))
        if best is None or e < best:
            best_s, best_a, best = s, alpha, e
    return best_s, best_a


@torch.no_grad()
def fold(session, group: ScaleGroup, s: torch.Tensor) -> None:
    """x / s into the producer, W * s into the consumers' input columns."""
    anatomy = session.anatomy
    if group.producer_kind == "norm":
        norm = anatomy.blocks[group.block].module.get_submodule(group.producer)
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
    else:
        producer = anatomy.linear(group.producer)
        weight_matrix(producer).div_(s[:, None])
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s)
    for name in group.consumers:
        weight_matrix(anatomy.linear(name)).mul_(s[None, :])


def block_output(session, trace, index: int) -> torch.Tensor:
    call = trace.calls[index]
    block = session.anatomy.block_list[index]
    h = trace.states[index]
    with torch.inference_mode():
        out = block(*call.args, hidden_states=h, **call.kwargs) if call.hidden_as_kwarg else \
            block(h, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def apply_scaling(session, data: EvalData, method: str, bits: int = 4, group_size: int | None = 32,
                  symmetric: bool = False, control: RunControl | None = None) -> dict:
    """Search and fold scales for every group. Returns a summary: groups scaled, skipped, alphas."""
    steps = scaling_steps(session, data, method, bits, group_size, symmetric, control)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def scaling_steps(session, data: EvalData, method: str, bits: int = 4, group_size: int | None = 32,
                  symmetric: bool = False, control: RunControl | None = None):
    """apply_scaling, yielding (groups done, groups) as it goes so a long search shows progress;
    returns the summary."""
    control = control or RunControl()
    batch = data.calibration_batches[0]
    groups = find_scale_groups(session, batch)
    yield 0, len(groups)
    inputs = collect_inputs(session, groups, data, control)
    trace, _ = session.replayer.trace(batch)
    alphas, skipped = {}, []
    for i, group in enumerate(groups):
        control.checkpoint()
        yield i, len(groups)
        if i not in inputs:  # its consumer did not run on every calibration batch
            skipped.append(f"{group.block}:{group.producer}")
            continue
        weights = _weights(session, group)
        x = inputs[i]
        if method == "smoothquant":
            s, alpha = smoothquant_scales(x, weights)
            if alpha < 0:
                continue
        else:
            s, alpha = awq_scales(x, weights, bits, group_size, symmetric)
            if alpha == 0:
                continue
        before = block_output(session, trace, group.block)
        snapshot = _snapshot(session, group)
        fold(session, group, s)
        after = block_output(session, trace, group.block)
        change = float((after - before).norm() / before.norm().clamp(min=1e-12))
        if change > FOLD_TOLERANCE:  # this producer does not scale linearly (e.g. Gemma's 1 + w)
            _restore(snapshot)
            skipped.append(f"{group.block}:{group.producer}")
            continue
        alphas[f"{group.block}:{group.producer}"] = alpha
    return {"method": method, "groups": len(groups), "scaled": len(alphas), "alphas": alphas, "skipped": skipped}


def _snapshot(session, group: ScaleGroup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    anatomy = session.anatomy
    modules = [anatomy.linear(n) for n in group.consumers]
    modules.append(anatomy.blocks[group.block].module.get_submodule(group.producer) if group.producer_kind == "norm"
                   else anatomy.linear(group.producer))
    params = [p for m in modules for p in (m.weight, getattr(m, "bias", None)) if p is not None]
    return [(p, p.detach().clone()) for p in params]


@torch.no_grad()
def _restore(snapshot) -> None:
    for param, value in snapshot:
        param.copy_(value)



# ---- the treatments --------------------------------------------------------------------------

class _ScalingTreatment(Treatment):
    method = ""
    label = ""

    def units(self, session, plan):
        # per-block figures before and after, the scale search (counted as one unit per block), and
        # five whole-model measurements
        return 3 * session.anatomy.num_blocks + 5

    def run(self, job):
        """Per-layer and whole-model figures of the plan's target before and after folding the
        scales; a fold that makes the deployed model worse on held-out text is rolled back."""
        session, plan = job.session, job.plan
        target = create(plan.target)
        blocks = job.all_blocks
        yield job.enter(f"{self.name}: before")
        before_layers: list[float] = []
        yield from collect(job.isolated(plan.target, blocks), before_layers)
        yield job.enter(f"{self.name}: whole-model figures before")
        before = job.whole_model(plan.target)
        yield job.tick()
        choice_before = job.choice_kl(plan.target)
        yield job.tick()
        rollback = rollback_point(session)
        session.begin_weight_treatment()
        yield job.enter(f"{self.name}: searching scales (calibration text)")
        summary = yield from job.track(
            scaling_steps(session, job.data, self.method, bits=getattr(target, "bits", 4),
                          group_size=getattr(target, "group", None), symmetric=getattr(target, "symmetric", True),
                          control=job.control), len(blocks), "layer groups")
        session.weights_changed(function_preserving=True)
        yield job.enter(f"{self.name}: checking the float model is unchanged")
        float_change = job.whole_model("none", keep=[], temperature=1.0, knowledge=False)["kl_mean"]
        yield job.tick()
        yield job.enter(f"{self.name}: after")
        after_layers: list[float] = []
        yield from collect(job.isolated(plan.target, blocks), after_layers)
        yield job.enter(f"{self.name}: whole-model figures after")
        after = job.whole_model(plan.target)
        yield job.tick()
        choice_after = job.choice_kl(plan.target)
        yield job.tick()
        # Kept or rolled back on the selection split; the figures shown are the evaluation split's.
        applied = summary["scaled"] > 0 and choice_after < choice_before
        if applied:
            verdict = (f"{self.label} scales folded into {summary['scaled']} of {summary['groups']} layer groups: "
                       f"{figures_text(before, after)}.")
        else:
            rollback()
            why = (f"no layer group gained from {self.label} scaling" if not summary["scaled"] else
                   f"{self.label} scaling made {plan.target} worse on the selection text (mean KL "
                   f"{choice_before:.4f} → {choice_after:.4f})")
            verdict = f"Rolled back: {why}."
        return Outcome(
            name=self.name, title=f"{self.label} scaling for {plan.target}",
            deployment=f"{plan.target} on every block", before=before, after=after, applied=applied,
            verdict=verdict, summary=f"{self.label} scales in {summary['scaled']} layer groups",
            layers={"modification": plan.target, "targets": blocks, "before": before_layers, "after": after_layers},
            details={**summary, "float_model_kl_after_fold": float_change,
                     "selection_kl": {"before": choice_before, "after": choice_after}})


@register
class SmoothQuantTreatment(_ScalingTreatment):
    name = "smoothquant"
    order = 1
    method = "smoothquant"
    label = "SmoothQuant"
    title = "Activation-aware scaling for int8 dynamic (SmoothQuant)"
    summary = ("moves activation outliers into the weights (strength α searched per layer group on "
               "calibration text), folded into the norms and MLP linears so the float model is unchanged")

    def check(self, plan):
        if not plan.target.startswith("int8-dynamic"):  # int8-dynamic or int8-dynamic-decode
            raise PlanError("SmoothQuant scaling treats int8-dynamic; for weight-only int-N choose AWQ scaling.")


@register
class AwqTreatment(_ScalingTreatment):
    name = "awq"
    order = 2
    method = "awq"
    label = "AWQ"
    title = "Activation-aware scaling for weight-only int-N (AWQ)"
    summary = ("protects the weight columns that see large activations (scale exponent searched per layer "
               "group on calibration text), folded so the float model is unchanged")

    def check(self, plan):
        if not hasattr(create(plan.target), "bits"):
            raise PlanError("AWQ scaling treats weight-only quantization (int4, int4-g32, …); "
                            "for int8-dynamic choose SmoothQuant.")
