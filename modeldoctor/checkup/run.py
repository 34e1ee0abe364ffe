"""Run a checkup: a generator of events that the CLI prints, the app draws, tests assert on.

Every probe applies its modification inside a context manager, so the model is restored
exactly after each probe, after an error and after a cancel.
"""

from __future__ import annotations

import time
import traceback
from typing import Iterator

from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.checkup.verdict import findings, flag_outliers, judge
from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.errors import CancelledError, ModelDoctorError
from modeldoctor.events import (
    Event, Failed, Finished, LogMessage, PlanReady, Progress, ProbeResult, ProbeStarted, Stage, run_to_end,
)
from modeldoctor.metrics import attention as attention_metrics
from modeldoctor.metrics import decoding as decoding_metrics
from modeldoctor.metrics.cascade import CascadeAccumulator
from modeldoctor.metrics.divergence import (
    DivergenceAccumulator, answer_positions_mask, knowledge_correct_sparse,
)
from modeldoctor.modifications.base import create
from modeldoctor.report.results import CheckupReport, ProbeRecord, ProbeSpec
from modeldoctor.resources import resource
from modeldoctor.session import Reference, Session

ATTENTION_TOKENS = 128


def _probe_cost(session: Session, spec: ProbeSpec, prefix_cache: bool) -> float:
    """Relative cost in block-equivalents, for a fair ETA: later blocks are cheaper to probe."""
    anatomy = session.anatomy
    block_params = sum(m.weight.numel() for m in anatomy.blocks[0].linears.values()) or 1
    head = anatomy.head.weight.numel() / block_params
    if spec.family == "decoding":
        return 8 * (anatomy.num_blocks + head)
    start = spec.block if prefix_cache else 0
    return anatomy.num_blocks - start + head


def _decoding_prompts() -> list[str]:
    return [line.strip() for line in resource("data", "prompts.txt").read_text("utf-8").splitlines() if line.strip()]


class _CumulativeCarry:
    """Hidden states of the previous cumulative step, so step k restarts at target k's block."""

    def __init__(self) -> None:
        self.modification = None
        self.states: dict[str, list[dict]] = {}

    def start_state(self, spec: ProbeSpec, kind: str, batch: int, block: int):
        if spec.mode != "cumulative" or spec.step == 1 or self.modification != spec.modification:
            return None
        return self.states[kind][batch].get(block)


def measure(session: Session, ref: Reference, data: EvalData, plan: CheckupPlan, spec: ProbeSpec,
            control: RunControl, carry: _CumulativeCarry | None = None,
            keep: frozenset[str] = frozenset(), temperature: float = 1.0) -> ProbeRecord:
    """Apply one probe's modification (leaving `keep` linears alone), measure it against the
    reference, restore the model. The logits are divided by `temperature` (decoding calibration)."""
    began = time.monotonic()
    mod = create(spec.modification)
    ctx = session.mod_context(data, mod.needs_input_norms, control, mod.needs_gradients, keep)
    if mod.family == "decoding":
        if ref.continuations is None:
            ref.continuations = decoding_metrics.reference_continuations(
                session.model, session.tokenizer, _decoding_prompts())
        metrics, samples = decoding_metrics.compare(session.model, session.tokenizer, ref.continuations, mod.settings)
        control.checkpoint()
        bleeding, level, reason = judge(metrics, mod.family, plan.threshold)
        return ProbeRecord(spec, metrics, bleeding, level, reason, samples=samples,
                           seconds=time.monotonic() - began)

    start = spec.block if plan.prefix_cache else 0
    replayer = session.replayer
    want_attention = plan.attention and mod.family == "structure"
    if want_attention and ref.attention is None:  # before the modification is applied
        ids = data.eval_batches[0].input_ids[:1, :ATTENTION_TOKENS]
        ref.attention = attention_metrics.attention_maps(session.model, session.anatomy, ids)
    new_states: dict[str, list[dict]] = {"eval": [], "knowledge": []}
    with mod.applied(ctx, list(spec.targets)):
        divergence = DivergenceAccumulator()
        cascade = CascadeAccumulator(session.anatomy.num_blocks)
        for number, batch in enumerate(data.eval_batches):
            control.checkpoint()
            trace = ref.traces[number]
            hidden = carry.start_state(spec, "eval", number, start) if carry and plan.prefix_cache else None
            run = replayer.run_from(trace, start, hidden)
            logits = run.logits if temperature == 1.0 else run.logits / temperature
            divergence.add(ref.logprobs[number], ref.next_logprob[number], logits, batch.input_ids,
                           batch.attention_mask)
            cascade.add(trace.states, run.states, batch.attention_mask)
            new_states["eval"].append(run.states)
        metrics = divergence.summary()
        if plan.knowledge and data.knowledge_batches:
            hits = []
            for number, batch in enumerate(data.knowledge_batches):
                control.checkpoint()
                hidden = carry.start_state(spec, "knowledge", number, start) if carry and plan.prefix_cache else None
                mask = answer_positions_mask(tuple(batch.input_ids.shape), batch.answer_positions)
                run = replayer.run_from(ref.knowledge_traces[number], start, hidden, head_mask=mask)
                hits += knowledge_correct_sparse(run.logits, mask, batch.answer_positions, batch.answer_tokens)
                new_states["knowledge"].append(run.states)
            metrics["knowledge_accuracy"] = sum(hits) / len(hits)
            metrics["knowledge_ref"] = sum(ref.knowledge_hits) / len(ref.knowledge_hits)
        attention = {}
        if want_attention:
            control.checkpoint()
            ids = data.eval_batches[0].input_ids[:1, :ATTENTION_TOKENS]
            modified = attention_metrics.attention_maps(session.model, session.anatomy, ids)
            attention = attention_metrics.disruption(ref.attention, modified, session.anatomy.num_blocks)
    if carry is not None:
        carry.modification = spec.modification
        carry.states = new_states
    bleeding, level, reason = judge(metrics, mod.family, plan.threshold)
    return ProbeRecord(spec, metrics, bleeding, level, reason, cascade=cascade.result(), attention=attention,
                       seconds=time.monotonic() - began)


def run_checkup(session: Session, plan: CheckupPlan, data: EvalData,
                control: RunControl | None = None) -> Iterator[Event]:
    """Yield events while probing; the last event is always Finished (with the report)."""
    control = control or RunControl()
    began = time.monotonic()
    report = CheckupReport(model=session.summary.as_dict(), plan=plan.as_dict(), data=data.describe(), reference={})
    try:
        probes, skipped = build_probes(plan, session.anatomy)
        for note in data.notes:
            yield LogMessage(note, "warning")
        yield Stage("reference", f"unmodified model on {data.eval_tokens} tokens")
        ref = session.reference(data, control)
        report.reference = dict(ref.figures)
        if any(create(p.modification).needs_input_norms for p in probes):
            yield Stage("calibration", f"activation norms on {data.calibration_tokens} calibration tokens")
            session.input_norms(data, control)
        if any(create(p.modification).needs_gradients for p in probes):
            yield Stage("calibration", f"loss gradients on {data.calibration_tokens} calibration tokens")
            session.gradient_norms(data, control)
        yield PlanReady(tuple(probes), tuple(skipped))
        for note in skipped:
            yield LogMessage(note)
        costs = [_probe_cost(session, p, plan.prefix_cache) for p in probes]
        total_cost, done_cost = sum(costs), 0.0
        probe_began = time.monotonic()
        carry = _CumulativeCarry()
        for spec, cost in zip(probes, costs):
            control.checkpoint()
            yield ProbeStarted(spec)
            record = measure(session, ref, data, plan, spec, control, carry)
            report.probes.append(record)
            yield ProbeResult(record)
            done_cost += cost
            elapsed = time.monotonic() - probe_began
            eta = elapsed / done_cost * (total_cost - done_cost) if done_cost else None
            yield Progress(len(report.probes), len(probes), time.monotonic() - began, eta)
        _finish(report, plan, "completed", began)
        yield Finished("completed", f"{len(report.probes)} probes, {report.findings['bleeding_count']} bleeding",
                       report)
    except CancelledError as exc:
        _finish(report, plan, "cancelled", began)
        yield Finished("cancelled", str(exc), report)
    except ModelDoctorError as exc:
        _finish(report, plan, "failed", began)
        yield Failed(str(exc))
        yield Finished("failed", str(exc), report)
    except Exception as exc:  # an engine bug must reach the user as a message, not kill the app
        _finish(report, plan, "failed", began)
        yield Failed(f"Unexpected error during the checkup: {exc}", traceback.format_exc())
        yield Finished("failed", str(exc), report)


def _finish(report: CheckupReport, plan: CheckupPlan, status: str, began: float) -> None:
    report.probes = flag_outliers(report.probes, plan.threshold, plan.outlier_k)
    report.findings = findings(report.probes, plan.threshold)
    report.status = status
    report.elapsed_s = time.monotonic() - began


def checkup(session: Session, plan: CheckupPlan, data: EvalData, control: RunControl | None = None) -> CheckupReport:
    """Run to the end and return the report; raises on failure or cancel."""
    return run_to_end(run_checkup(session, plan, data, control))


def sample_continuations(session: Session, spec: ProbeSpec, data: EvalData | None = None, prompts: int = 3,
                         new_tokens: int = 24) -> list[dict[str, str]]:
    """Greedy continuations of the built-in prompts by the reference and by the modified model."""
    from modeldoctor.modifications.decoding import GREEDY

    texts = _decoding_prompts()[:prompts]
    mod = create(spec.modification)
    settings = getattr(mod, "settings", GREEDY)
    ctx = session.mod_context(data, mod.needs_input_norms, need_gradients=mod.needs_gradients)
    out = []
    for text in texts:
        ids = session.tokenizer(text)["input_ids"]
        reference = decoding_metrics.generate(session.model, session.tokenizer, ids, GREEDY, new_tokens)
        with mod.applied(ctx, list(spec.targets)):
            modified = decoding_metrics.generate(session.model, session.tokenizer, ids, settings, new_tokens)
        out.append({"prompt": text, "reference": session.tokenizer.decode(reference, skip_special_tokens=True),
                    "modified": session.tokenizer.decode(modified, skip_special_tokens=True)})
    return out
