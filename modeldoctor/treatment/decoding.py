"""Decoding calibration, the hemorrhage study's third mitigation.

A compressed model's next-token distributions are often too sharp or too flat compared with
the original's. One temperature T for the deployed model's logits is fitted on calibration
text to minimise KL(original ‖ deployed / T); it is kept only if it lowers KL on the selection
split; the figures before and after are measured on the evaluation split, together with how
far generations under the user's decoding settings drift from the original's. T goes into
the exported generation config.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from modeldoctor.metrics.decoding import NEW_TOKENS, generate, processors
from modeldoctor.modifications.base import create, token_mask
from modeldoctor.treatment.base import Outcome, Treatment, figures_text, register

LOG_T_RANGE = (-1.2, 1.2)  # T from 0.30 to 3.3
GOLDEN_STEPS = 24
SEEDS = (0, 1)


def golden_minimum(f, low: float, high: float, steps: int = GOLDEN_STEPS) -> float:
    """The minimiser of a unimodal f on [low, high]."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_temperature(ref_logprobs: list, logits: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[float, float, float]:
    """(T, mean KL at T = 1, mean KL at T) over the valid tokens of the calibration batches."""
    def mean_kl(log_t: float) -> float:
        total, count = 0.0, 0
        for ref, z, mask in zip(ref_logprobs, logits, masks):
            kl = ref.kl_to(torch.log_softmax(z / math.exp(log_t), -1))
            total += float(kl[mask].sum())
            count += int(mask.sum())
        return total / max(count, 1)

    best = golden_minimum(mean_kl, *LOG_T_RANGE)
    return math.exp(best), mean_kl(0.0), mean_kl(best)


def deployed_logits(job, modification: str, keep: list[str]) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
    """The untreated reference and the deployed model's logits on the calibration split."""
    session, data = job.session, job.calibration
    ref = session.reference(data, job.control)
    logits = []
    with job.deployed(modification, keep) as ctx:
        for trace, batch in zip(ref.traces, data.eval_batches):
            job.control.checkpoint()
            with token_mask(ctx, batch.attention_mask):  # padded rows: each sequence its own call
                logits.append(session.replayer.run_from(trace, 0, keep_states=False).logits.float())
    return ref.logprobs, logits, [b.attention_mask.bool() for b in data.eval_batches]


def generation_divergence(job, modification: str, keep: list[str], temperatures: list[float],
                          settings) -> list[dict[str, float]]:
    """For each temperature: generations of the deployed model against the original's under
    the same decoding settings and seeds (tokens kept, first divergence), and the KL of the
    two decoding distributions (after temperature, top-k, top-p) along the original's
    trajectory. The original's generations and the deployed logits along them are the same
    for every temperature, so they are computed once."""
    from modeldoctor.checkup.run import _decoding_prompts

    session, tokenizer = job.session, job.session.tokenizer
    chain = processors(settings)
    figures = [{"agreement": [], "first": [], "kl": []} for _ in temperatures]
    for prompt in _decoding_prompts():
        ids = tokenizer(prompt)["input_ids"]
        for seed in SEEDS:
            job.control.checkpoint()
            with session.original_weights():
                reference = generate(session.model, tokenizer, ids, settings, NEW_TOKENS, seed)
                with torch.inference_mode():
                    ref_logits = session.model(input_ids=torch.tensor([ids + reference]), use_cache=False).logits[0]
            full = torch.tensor([ids + reference])
            with job.deployed(modification, keep):
                with torch.inference_mode():
                    mod_logits = session.model(input_ids=full, use_cache=False).logits[0]
                samples = [generate(session.model, tokenizer, ids,
                                    replace(settings, temperature=settings.temperature * t) if settings.do_sample
                                    else settings, NEW_TOKENS, seed) for t in temperatures]
            for temperature, tokens, out in zip(temperatures, samples, figures):
                same = [a == b for a, b in zip(tokens, reference)]
                out["agreement"].append(np.mean(same))
                out["first"].append(same.index(False) if False in same else len(same))
                for step in range(len(reference)):
                    position = len(ids) - 1 + step
                    prefix = full[:, :position + 1]
                    p = torch.log_softmax(chain(prefix, ref_logits[position][None].float().clone()), -1)
                    q = torch.log_softmax(chain(prefix, mod_logits[position][None].float() / temperature), -1)
                    both = torch.isfinite(p) & (p.exp() > 0)
                    q_safe = torch.where(torch.isfinite(q), q, torch.full_like(q, -1e4))
                    out["kl"].append(float((p.exp() * (p - q_safe))[both].sum()))
    return [{"token_agreement": float(np.mean(f["agreement"])), "first_divergence": float(np.mean(f["first"])),
             "kl_trajectory": float(np.mean(f["kl"]))} for f in figures]


@register
class TemperatureCalibration(Treatment):
    name = "calibrate-temperature"
    order = 4
    title = "Decoding calibration (temperature)"
    summary = ("fits one temperature for the deployed model's logits on calibration text so its next-token "
               "distribution matches the original's; the value goes into the exported generation config")

    def units(self, session, plan):
        return 5

    def run(self, job):
        session, plan = job.session, job.plan
        state = session.treatment
        keep = job.kept_for(plan.target)
        settings = create(plan.decoding).settings
        yield job.enter("decoding calibration: fitting the temperature on calibration text")
        refs, logits, masks = deployed_logits(job, plan.target, keep)
        temperature, fit_before, fit_after = fit_temperature(refs, logits, masks)
        del logits
        yield job.tick()
        yield job.enter("decoding calibration: checking it on selection text")
        choice_before = job.choice_kl(plan.target, keep=keep, temperature=1.0)
        choice_after = job.choice_kl(plan.target, keep=keep, temperature=temperature)
        yield job.enter("decoding calibration: held-out figures")
        before = job.whole_model(plan.target, keep=keep, temperature=1.0)
        yield job.tick()
        after = job.whole_model(plan.target, keep=keep, temperature=temperature)
        yield job.tick()
        yield job.enter(f"decoding calibration: generations under {plan.decoding}")
        sequence_before, sequence_after = generation_divergence(job, plan.target, keep, [1.0, temperature],
                                                                settings)
        yield job.tick(2)
        applied = choice_after < choice_before
        deployment = f"{plan.target} on every block" if plan.target != "none" else "the treated model"
        if applied:
            state.temperature, state.temperature_for = temperature, plan.target
            verdict = (f"Temperature {temperature:.3f} for {deployment}: {figures_text(before, after)}; under "
                       f"{plan.decoding}, tokens kept {sequence_before['token_agreement']:.0%} → "
                       f"{sequence_after['token_agreement']:.0%}.")
        else:
            verdict = (f"Not applied: the best temperature on calibration text ({temperature:.3f}) does not lower "
                       f"KL on the selection text ({choice_before:.4f} → {choice_after:.4f}).")
        if not settings.do_sample:
            verdict += " Greedy decoding ignores temperature, so its generations are unchanged."
        table = [{"decoding": plan.decoding, "temperature": 1.0, **sequence_before},
                 {"decoding": plan.decoding, "temperature": temperature, **sequence_after}]
        return Outcome(
            name=self.name, title=f"{self.title} for {deployment}", deployment=deployment, before=before,
            after=after, applied=applied, verdict=verdict, summary=f"logits ÷ {temperature:.3f} (calibrated temperature, in the exported generation config)",
            table=table, details={"temperature": temperature, "calibration_kl_before": fit_before,
                                  "calibration_kl_after": fit_after, "logit_bias": "not fitted",
                                  "selection_kl": {"before": choice_before, "after": choice_after}})
