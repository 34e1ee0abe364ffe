"""Gradient-aware pruning, the hemorrhage study's first mitigation.

Importance |W|·(‖x‖ + α·‖∂L/∂W‖) (Wanda's activation norms plus first-order loss gradients
accumulated over calibration batches), pruned per output row to the requested sparsity, or
2:4. α and the best of magnitude, Wanda and gradient-aware pruning are chosen on the
selection split; the evaluation split reports all three, and the best is written into the
treated model.
"""

from __future__ import annotations

import torch

from modeldoctor.errors import PlanError
from modeldoctor.modifications.base import create
from modeldoctor.treatment.base import Outcome, Treatment, collect, figures_text, register

ALPHAS = (0.05, 0.1, 0.2, 0.5, 1.0)  # weight of the gradient term; α → 0 is Wanda


def method_names(sparsity: float, pattern: str) -> dict[str, str]:
    """Label -> modification name of each method compared at this sparsity (all in the same
    pattern, so whichever wins keeps the pattern the user asked for)."""
    if pattern == "2of4":
        return {"Wanda": "prune-2of4", "gradient-aware": "prune-grad-2of4"}
    pct = round(sparsity * 100)
    return {"magnitude": f"prune-mag-{pct}", "Wanda": f"prune-wanda-{pct}", "gradient-aware": f"prune-grad-{pct}"}


def with_alpha(name: str, alpha: float) -> str:
    return f"{name}-a{alpha:g}"


@torch.no_grad()
def bake(session, modification: str, data) -> None:
    """Write the modification's weights into the model for good (the context restores them
    on exit, so the pruned values are copied out first and written back after)."""
    mod = create(modification)
    ctx = session.mod_context(data, mod.needs_input_norms, need_gradients=mod.needs_gradients)
    blocks = [str(b.index) for b in session.anatomy.blocks]
    names = [n for t in blocks for n in mod.linears_for(ctx, t)]
    with mod.applied(ctx, blocks):
        pruned = {n: session.anatomy.linear(n).weight.detach().clone() for n in names}
    for name, value in pruned.items():
        session.anatomy.linear(name).weight.copy_(value)


@register
class GradientPruning(Treatment):
    name = "prune-grad"
    order = 0
    title = "Gradient-aware pruning"
    summary = ("keeps the weights whose removal would raise the loss most: |W|·(‖x‖ + α·‖∂L/∂W‖) from "
               "calibration gradients, compared with magnitude and Wanda at the same sparsity")

    def check(self, plan):
        if plan.pattern == "unstructured" and round(plan.sparsity * 100) not in range(1, 100):
            raise PlanError("Choose a pruning sparsity between 1 % and 99 %.")

    def units(self, session, plan):
        return len(ALPHAS) + len(method_names(plan.sparsity, plan.pattern)) + 2 * session.anatomy.num_blocks + 1

    def run(self, job):
        session, plan = job.session, job.plan
        methods = method_names(plan.sparsity, plan.pattern)
        yield job.enter("gradient-aware pruning: loss gradients (calibration text), α (selection text)")
        fits = {}
        for alpha in ALPHAS:
            fits[alpha] = job.choice_kl(with_alpha(methods["gradient-aware"], alpha), keep=[], temperature=1.0)
            yield job.tick()
        alpha = min(fits, key=fits.get)
        methods["gradient-aware"] = with_alpha(methods["gradient-aware"], alpha)
        yield job.enter("gradient-aware pruning: magnitude vs Wanda vs gradient-aware")
        rows = []
        for label, name in methods.items():
            choice = fits[alpha] if label == "gradient-aware" else job.choice_kl(name, keep=[], temperature=1.0)
            figures = job.whole_model(name, keep=[], temperature=1.0)
            rows.append({"method": label, "modification": name, **figures, "selection_kl": choice})
            yield job.tick()
        best = min(rows, key=lambda r: r["selection_kl"])  # chosen on selection text, reported on held-out
        wanda = next(r for r in rows if r["method"] == "Wanda")
        gradient = next(r for r in rows if r["method"] == "gradient-aware")
        yield job.enter("gradient-aware pruning: per block")
        blocks = job.all_blocks
        before_layers: list[float] = []
        after_layers: list[float] = []
        yield from collect(job.isolated(wanda["modification"], blocks, keep=[]), before_layers)
        yield from collect(job.isolated(gradient["modification"], blocks, keep=[]), after_layers)
        before = {k: v for k, v in wanda.items() if k not in ("method", "modification", "selection_kl")}
        session.begin_weight_treatment()
        bake(session, best["modification"], job.data)
        session.weights_changed(function_preserving=False)
        after = job.whole_model("none", keep=[], temperature=1.0)
        yield job.tick()
        amount = "2:4" if plan.pattern == "2of4" else f"{plan.sparsity:.0%}"
        if best is gradient:
            verdict = (f"Gradient-aware pruning (α = {alpha:g}) beats Wanda at {amount}: "
                       f"{figures_text(wanda, gradient)}; its weights are now the treated model's.")
        else:
            verdict = (f"Gradient-aware pruning did not win on this model at {amount} (selection-text mean KL "
                       f"{gradient['selection_kl']:.4f} against {best['method']}'s {best['selection_kl']:.4f}); "
                       f"the {best['method']} result was written instead.")
        return Outcome(
            name=self.name, title=f"{self.title} to {amount} sparsity",
            deployment=f"the pruned model (weights pruned in every block linear to {amount})",
            before=before, after=after, applied=True, verdict=verdict,
            summary=f"{best['method']} pruning to {amount}",
            layers={"modification": f"{wanda['modification']} → {gradient['modification']}", "targets": blocks,
                    "before": before_layers, "after": after_layers, "before_label": "Wanda",
                    "after_label": "gradient-aware"},
            table=rows, details={"alpha": alpha, "alpha_selection_kl": {f"{a:g}": v for a, v in fits.items()},
                                 "written": best["modification"]})
