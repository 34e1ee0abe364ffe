"""Knowledge-recovery prompting.

Compressed models mostly displace knowledge rather than forget it, so a short cue before the
question can bring an answer back. A pool of hand-written recovery prompts is scored on one
half of the knowledge probes (selection); the other half (evaluation) reports the accuracy
of the original model, the compressed model, the compressed model with the best single
prompt, and with a prompt chosen per input by the model's own confidence (the probability
of its top next token; the answer is never looked at).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from modeldoctor.data.sources import KnowledgeProbe, knowledge_batches, load_knowledge_probes
from modeldoctor.errors import PlanError
from modeldoctor.metrics.divergence import knowledge_correct
from modeldoctor.modifications.base import token_mask
from modeldoctor.resources import resource
from modeldoctor.treatment.base import Outcome, Treatment, register

NO_PROMPT = ""


def recovery_prompts() -> list[str]:
    lines = resource("data", "recovery_prompts.txt").read_text("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def split_probes(probes: list[KnowledgeProbe], seed: int) -> tuple[list[KnowledgeProbe], list[KnowledgeProbe]]:
    """(selection half, evaluation half), seeded."""
    order = np.random.default_rng(seed).permutation(len(probes))
    half = len(probes) // 2
    return [probes[i] for i in order[:half]], [probes[i] for i in order[half:]]


def with_prompt(prompt: str, probes: list[KnowledgeProbe]) -> list[KnowledgeProbe]:
    if not prompt:
        return probes
    return [KnowledgeProbe(p.topic, f"{prompt}\n{p.prompt}", p.answer) for p in probes]


def score(session, probes: list[KnowledgeProbe], control, ctx=None) -> tuple[np.ndarray, np.ndarray]:
    """Per probe, in order: answered correctly, and the model's confidence in its first answer
    token. `ctx`: the deployed modification's context, told which positions are padding."""
    correct = np.zeros(len(probes), dtype=bool)
    confidence = np.zeros(len(probes))
    for batch in knowledge_batches(session.tokenizer, probes):
        control.checkpoint()
        masked = token_mask(ctx, batch.attention_mask) if ctx is not None else contextlib.nullcontext()
        with masked, torch.inference_mode():
            logits = session.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   use_cache=False).logits.float()
        hits = knowledge_correct(logits, batch.answer_positions, batch.answer_tokens)
        for row, (index, positions) in enumerate(zip(batch.probe_indices, batch.answer_positions)):
            correct[index] = hits[row]
            confidence[index] = float(torch.softmax(logits[row, positions[0]], -1).max())
    return correct, confidence


def per_input_accuracy(scored: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, np.ndarray]:
    """Accuracy when each probe takes the prompt the model is most confident under (the answer
    is never looked at), and which prompt that was; `scored` holds (correct, confidence) per prompt."""
    correct = np.stack([c for c, _ in scored])  # prompts x probes
    confidence = np.stack([k for _, k in scored])
    pick = confidence.argmax(0)
    return float(correct[pick, np.arange(correct.shape[1])].mean()), pick


@register
class KnowledgeRecovery(Treatment):
    name = "recovery-prompts"
    order = 5
    title = "Knowledge-recovery prompting"
    summary = ("a short cue before each question brings displaced knowledge back: the best single prompt, "
               "and a prompt chosen per input by the model's confidence")

    def check(self, plan):
        if len(load_knowledge_probes()) < 20:
            raise PlanError("Knowledge-recovery prompting needs the built-in knowledge probes.")

    def units(self, session, plan):
        return 2 + 2 * (len(recovery_prompts()) + 1)

    def run(self, job):
        session, plan = job.session, job.plan
        selection, evaluation = split_probes(load_knowledge_probes(), job.data.spec.seed)
        pool = [NO_PROMPT] + recovery_prompts()
        yield job.enter("knowledge recovery: the original model")
        with session.original_weights():
            original, _ = score(session, evaluation, job.control)
        yield job.tick()
        compressed = {}
        with job.deployed(plan.target) as ctx:
            for prompt in pool:
                yield job.enter(f"knowledge recovery: prompt {pool.index(prompt) + 1} of {len(pool)}")
                chosen_half = score(session, with_prompt(prompt, selection), job.control, ctx)
                held_out = score(session, with_prompt(prompt, evaluation), job.control, ctx)
                compressed[prompt] = (chosen_half, held_out)
                yield job.tick(2)
        yield job.tick()
        # Every choice (best prompt, which rule, whether to apply) on the selection half.
        best = max(pool, key=lambda p: (compressed[p][0][0].mean(), p == NO_PROMPT))
        chosen_per_input = {half: per_input_accuracy([compressed[p][half] for p in pool]) for half in (0, 1)}
        choice = {"compressed": float(compressed[NO_PROMPT][0][0].mean()),
                  "best_prompt": float(compressed[best][0][0].mean()), "per_input": chosen_per_input[0][0]}
        rule = "per-input" if choice["per_input"] >= choice["best_prompt"] else "best-prompt"
        applied = choice["per_input" if rule == "per-input" else "best_prompt"] > choice["compressed"]
        confidence_choice = chosen_per_input[1][1]
        figures = {"original": float(original.mean()), "compressed": float(compressed[NO_PROMPT][1][0].mean()),
                   "best_prompt": float(compressed[best][1][0].mean()), "per_input": chosen_per_input[1][0]}
        recovered = figures["per_input" if rule == "per-input" else "best_prompt"]
        deployment = f"{plan.target} on every block" if plan.target != "none" else "the treated model"
        if applied:
            session.treatment.recovery = {"rule": rule, "best_prompt": best, "pool": pool[1:],
                                          "selection": "highest probability of the top next token",
                                          "for": plan.target, "accuracy": figures}
            verdict = (f"Knowledge probes (held-out half, {len(evaluation)}): original {figures['original']:.1%}, "
                       f"{deployment} {figures['compressed']:.1%}, with the best prompt {figures['best_prompt']:.1%}, "
                       f"with per-input selection {figures['per_input']:.1%}.")
        else:
            verdict = (f"Not applied: no recovery prompt helped {deployment} on the selection half of the probes "
                       f"({choice['compressed']:.1%} without, {choice['best_prompt']:.1%} with the best prompt, "
                       f"{choice['per_input']:.1%} per input).")
        table = [{"prompt": p or "(none)", "selection_accuracy": float(compressed[p][0][0].mean()),
                  "held_out_accuracy": float(compressed[p][1][0].mean()),
                  "chosen_per_input": float((confidence_choice == i).mean())} for i, p in enumerate(pool)]
        return Outcome(
            name=self.name, title=f"{self.title} for {deployment}", deployment=deployment,
            before={"knowledge_accuracy": figures["compressed"]},
            after={"knowledge_accuracy": recovered if applied else figures["compressed"]}, applied=applied,
            verdict=verdict, summary=f"recovery prompts ({rule})", table=table,
            details={"accuracy": figures, "selection_accuracy": choice, "best_prompt": best, "rule": rule,
                     "selection_probes": len(selection),
                     "evaluation_probes": len(evaluation)})
