"""Run a checkup: a generator of events that the CLI prints, the app draws, tests assert on.

Every probe applies its modification inside a context manager, so the model is restored
exactly after each probe, after an error and after a cancel.
"""

from __future__ import annotations

import dataclasses
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
from modeldoctor.modifications.base import create, token_mask
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
    if prefix_cache and spec.mode == "cumulative" and len(spec.targets) > 1:
        start = anatomy.block_of(spec.targets[-1])  # resumes from the previous step's states
    return anatomy.num_blocks - start + head


def _decoding_prompts() -> list[str]:
    return [line.strip() for line in resource("data", "prompts.txt").read_text("utf-8").splitlines() if line.strip()]


class _CumulativeCarry:
    """What a later cumulative step starts from: the hidden states entering the block of its
    newest target, as the probe of the targets before it left them (cumulative step k-1, or an
    identical isolated probe). Step k then reruns only from that block. Only that one block's
    states are kept, and only until the step that needs them has run."""

    def __init__(self, probes: list[ProbeSpec], anatomy, prefix_cache: bool) -> None:
        # (modification, targets) -> the block whose entering states a later step starts from
        self.wanted: dict[tuple, int] = {}
        if prefix_cache:
            for spec in probes:
                if spec.mode == "cumulative" and len(spec.targets) > 1:
                    self.wanted[(spec.modification, spec.targets[:-1])] = anatomy.block_of(spec.targets[-1])
        self.states: dict[tuple, tuple[int, dict[str, list]]] = {}

    def capture_block(self, spec: ProbeSpec) -> int | None:
        return self.wanted.get((spec.modification, spec.targets))

    def keep(self, spec: ProbeSpec, block: int, states: dict[str, list]) -> None:
        self.states[(spec.modification, spec.targets)] = (block, states)

    def start(self, spec: ProbeSpec) -> tuple[int, dict[str, list]] | None:
        """(block, states) to start this cumulative step from, or None to run from its first target."""
        if spec.mode != "cumulative" or len(spec.targets) < 2:
            return None
        return self.states.pop((spec.modification, spec.targets[:-1]), None)


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
    carried = carry.start(spec) if carry and plan.prefix_cache else None
    if carried is not None:
        start = carried[0]
    capture = carry.capture_block(spec) if carry and plan.prefix_cache else None
    captured: dict[str, list] = {"eval": [], "knowledge": []}

    def hidden_for(kind: str, number: int):
        return carried[1][kind][number] if carried is not None else None

    replayer = session.replayer
    want_attention = plan.attention and mod.family == "structure"
    if want_attention and ref.attention is None:  # before the modification is applied
        ids = data.eval_batches[0].input_ids[:1, :ATTENTION_TOKENS]
        ref.attention = attention_metrics.attention_maps(session.model, session.anatomy, ids)
    with mod.applied(ctx, list(spec.targets)):
        divergence = DivergenceAccumulator()
        cascade = CascadeAccumulator(session.anatomy.num_blocks)
        for number, batch in enumerate(data.eval_batches):
            control.checkpoint()
            trace = ref.traces[number]
            with token_mask(ctx, batch.attention_mask):  # padding stays out of per-sequence statistics
                run = replayer.run_from(trace, start, hidden_for("eval", number))
            logits = run.logits if temperature == 1.0 else run.logits / temperature
            divergence.add(ref.logprobs[number], ref.next_logprob[number], logits, batch.input_ids,
                           batch.attention_mask)
            cascade.add(trace.states, run.states, batch.attention_mask)
            if capture is not None:
                captured["eval"].append(run.states[capture])
            del run
        metrics = divergence.summary()
        if plan.knowledge and data.knowledge_batches:
            hits = []
            # A modified head sees every position, as deployed (int8 dynamic takes its range over
            # them all); an unmodified one need only run at the answer positions.
            head_modified = any(session.anatomy.block_of(t) >= session.anatomy.num_blocks for t in spec.targets)
            for number, batch in enumerate(data.knowledge_batches):
                control.checkpoint()
                mask = answer_positions_mask(tuple(batch.input_ids.shape), batch.answer_positions)
                with token_mask(ctx, batch.attention_mask):
                    run = replayer.run_from(ref.knowledge_traces[number], start, hidden_for("knowledge", number),
                                            keep_states=capture is not None,
                                            head_mask=None if head_modified else mask)
                answer_logits = run.logits[mask] if head_modified else run.logits
                hits += knowledge_correct_sparse(answer_logits, mask, batch.answer_positions, batch.answer_tokens)
                if capture is not None:
                    captured["knowledge"].append(run.states[capture])
            metrics["knowledge_accuracy"] = sum(hits) / len(hits)
            metrics["knowledge_ref"] = sum(ref.knowledge_hits) / len(ref.knowledge_hits)
        attention = {}
        if want_attention:
            control.checkpoint()
            ids = data.eval_batches[0].input_ids[:1, :ATTENTION_TOKENS]
            modified = attention_metrics.attention_maps(session.model, session.anatomy, ids)
            attention = attention_metrics.disruption(ref.attention, modified, session.anatomy.num_blocks)
    if capture is not None:
        carry.keep(spec, capture, captured)
    bleeding, level, reason = judge(metrics, mod.family, plan.threshold)
    return ProbeRecord(spec, metrics, bleeding, level, reason, cascade=cascade.result(), attention=attention,
                       seconds=time.monotonic() - began)


def probe_key(spec: ProbeSpec) -> tuple:
    """Probes with equal keys measure the same thing (e.g. an isolated block probe and the
    same block's sweep probe): one is measured, the others reuse it."""
    return (spec.modification, spec.targets)


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
        treated = session.treatment.original is not None
        yield Stage("reference", f"{'treated' if treated else 'unmodified'} model on {data.eval_tokens} tokens")
        # The model as it is now: after a weight-changing treatment the probes must replay the
        # treated model's own states, so the reference is rebuilt for every weights_version.
        ref = session.current_reference(data, control)
        report.reference = dict(ref.figures)
        if treated:
            report.reference["model"] = "treated: " + "; ".join(t["summary"] for t in session.treatment.applied)
        if any(create(p.modification).needs_input_norms for p in probes):
            yield Stage("calibration", f"activation norms on {data.calibration_tokens} calibration tokens")
            session.input_norms(data, control)
        if any(create(p.modification).needs_gradients for p in probes):
            yield Stage("calibration", f"loss gradients on {data.calibration_tokens} calibration tokens")
            session.gradient_norms(data, control)
        yield PlanReady(tuple(probes), tuple(skipped))
        for note in skipped:
            yield LogMessage(note)
        firsts = {}
        for spec in probes:
            firsts.setdefault(probe_key(spec), spec)
        repeats = len(probes) - len(firsts)
        if repeats:
            yield LogMessage(f"{repeats} probes measure the same as another one (e.g. a sweep point and the "
                             "isolated probe of the same block); each is measured once.")
        carry = _CumulativeCarry(probes, session.anatomy, plan.prefix_cache)
        costs = [_probe_cost(session, p, plan.prefix_cache) if firsts[probe_key(p)] is p else 0.0 for p in probes]
        total_cost, done_cost = sum(costs), 0.0
        probe_began = time.monotonic()
        measured: dict[tuple, ProbeRecord] = {}
        for spec, cost in zip(probes, costs):
            control.checkpoint()
            yield ProbeStarted(spec)
            key = probe_key(spec)
            if key in measured:
                record = dataclasses.replace(measured[key], spec=spec, seconds=0.0)
            else:
                record = measured[key] = measure(session, ref, data, plan, spec, control, carry)
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
