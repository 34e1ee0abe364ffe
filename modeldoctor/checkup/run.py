"""Run a checkup: a generator of events that the CLI prints, the app draws, tests assert on.

Every probe applies its modification inside a context manager, so the model is restored
exactly after each probe, after an error and after a cancel.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Iterator

import torch

from modeldoctor.checkup.context import run_context_sweep
from modeldoctor.checkup.estimate import estimable, estimate_kl
from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.checkup.timing import ProbeClock, knowledge_stage_probes, probe_cost
from modeldoctor.checkup.verdict import findings, flag_outliers, judge
from modeldoctor.control import RunControl
from modeldoctor.data import Batch, EvalData
from modeldoctor.errors import CancelledError, ModelDoctorError, ModelNotRestoredError, PlanError
from modeldoctor.memory import release_freed_memory
from modeldoctor.events import (
    Event, Failed, Finished, LogMessage, PlanReady, Progress, ProbeResult, ProbeStarted, Stage, run_to_end,
)
from modeldoctor.metrics import attention as attention_metrics
from modeldoctor.metrics import decoding as decoding_metrics
from modeldoctor.metrics import routing as routing_metrics
from modeldoctor.metrics.cascade import CascadeAccumulator
from modeldoctor.metrics.divergence import (
    DivergenceAccumulator, answer_positions_mask, knowledge_correct_sparse, summarise_head,
)
from modeldoctor.modifications.base import create, expand, token_mask
from modeldoctor.report.results import CheckupReport, ProbeRecord, ProbeSpec
from modeldoctor.resources import resource
from modeldoctor.session import Reference, Session

ATTENTION_TOKENS = 128


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


def changes_head(session: Session, spec: ProbeSpec) -> bool:
    """Whether the probe modifies the LM head (which comes after the last block)."""
    return any(session.anatomy.block_of(t) >= session.anatomy.num_blocks for t in spec.targets)


def measure(session: Session, ref: Reference, data: EvalData, plan: CheckupPlan, spec: ProbeSpec,
            control: RunControl, carry: _CumulativeCarry | None = None,
            keep: frozenset[str] = frozenset(), temperature: float = 1.0) -> ProbeRecord:
    """Apply one probe's modification (leaving `keep` linears alone), measure it against the
    reference, restore the model. The logits are divided by `temperature` (decoding calibration)."""
    began = control.clock()  # a pause is not probe time
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
                           seconds=control.clock() - began)

    if not mod.replays:
        return _measure_whole_model(session, ref, data, plan, spec, mod, ctx, control, began, temperature)

    # A probe that changes the embedding table (a tied head's shared table) reruns everything.
    fresh_embedding = any(mod.changes_embedding(session.anatomy, t) for t in spec.targets)
    head_changed = changes_head(session, spec)
    start = spec.block if plan.prefix_cache and not fresh_embedding else 0
    routing_reference = routing_metrics.reference_routing(session, ref, data)  # before the modification
    # A carried step would skip the routers of its earlier targets' blocks, whose routes it changed.
    carried = (carry.start(spec) if carry and plan.prefix_cache and not fresh_embedding and routing_reference is None
               else None)
    if carried is not None:
        start = carried[0]
    capture = carry.capture_block(spec) if carry and plan.prefix_cache and routing_reference is None else None
    captured: dict[str, list] = {"eval": [], "knowledge": []}

    def start_for(kind: str, number: int) -> tuple[int, torch.Tensor | None]:
        """Where this batch's replay starts: the carried states if the previous step kept them
        (it skips knowledge probes unless it bled), else the first modified block; a changed
        embedding starts from block 0 with the embedding recomputed."""
        if fresh_embedding:
            traces = ref.traces if kind == "eval" else ref.knowledge_traces
            return 0, session.replayer.embed(traces[number])
        if carried is not None and len(carried[1][kind]) > number:
            return start, carried[1][kind][number]
        return (spec.block if plan.prefix_cache else 0), None

    replayer = session.replayer
    want_attention = plan.attention and mod.family == "structure" and bool(session.anatomy.blocks_of_kind("attention"))
    whole_cache = mod.measures_cached_generation and set(spec.targets) == set(mod.blocks_it_applies_to(session.anatomy))
    if whole_cache:
        reference_cached_steps(session, ref)  # before the modification is applied
    if want_attention and "attention_trace" not in ref.extras:  # before the modification is applied
        _reference_attention(session, ref, data)
    with mod.applied(ctx, list(spec.targets)), routing_metrics.compared(session.anatomy, routing_reference) as routes:
        divergence = DivergenceAccumulator()
        cascade = CascadeAccumulator(session.anatomy.num_blocks)
        for number, batch in enumerate(data.eval_batches):
            control.checkpoint()
            trace = ref.traces[number]
            if routes is not None:
                routes.before(batch.attention_mask)
            begin, hidden = start_for("eval", number)
            with token_mask(ctx, batch.attention_mask):  # padding stays out of per-sequence statistics
                run = replayer.run_from(trace, begin, hidden, head=False)
                _add_divergence(divergence, replayer, ref, number, batch, run.states[max(run.states)], temperature,
                                head_changed)
            if routes is not None:
                routes.add(number, begin)
            cascade.add(trace.states, run.states, batch.attention_mask)
            if capture is not None:
                captured["eval"].append(run.states[capture])
            del run
        metrics = divergence.summary()
        routing = {}
        if routes is not None:
            routing_figures, routing = routes.finish()
            metrics.update(routing_figures)
        # Knowledge probes cost as much as the text again: scored here on every probe ("all") or on
        # each bleeding one ("bleeding"); by default ("worst") after all probes, on the worst few.
        knowledge = plan.knowledge and data.knowledge_batches and (
            plan.knowledge_on == "all"
            or (plan.knowledge_on == "bleeding" and judge(metrics, mod.family, plan.threshold)[0]))
        knowledge_seconds = 0.0
        if knowledge:
            knowledge_began = control.clock()
            metrics.update(_knowledge_metrics(session, ref, data, spec, ctx, control,
                                              lambda number: start_for("knowledge", number),
                                              captured["knowledge"] if capture is not None else None, capture))
            knowledge_seconds = control.clock() - knowledge_began
        attention = {}
        if want_attention:
            control.checkpoint()
            modified = _modified_attention(session, ref, spec.block if plan.prefix_cache and not fresh_embedding else 0)
            attention = attention_metrics.disruption(ref.attention, modified, session.anatomy.num_blocks)
        if whole_cache:
            metrics.update(_cached_generation(session, ref, control))  # the whole model: generation too
    if capture is not None:  # the knowledge states only if this step scored the knowledge probes
        carry.keep(spec, capture, captured)
    bleeding, level, reason = judge(metrics, mod.family, plan.threshold)
    return ProbeRecord(spec, metrics, bleeding, level, reason, cascade=cascade.result(), attention=attention,
                       seconds=control.clock() - began, knowledge_seconds=knowledge_seconds, routing=routing)


def _reference_attention(session: Session, ref: Reference, data: EvalData) -> None:
    """The unmodified model's attention maps on the start of the evaluation text, and a trace of
    that pass taken with eager attention (whose masks the maps need), for _modified_attention."""
    ids = data.eval_batches[0].input_ids[:1, :ATTENTION_TOKENS]
    traced = []  # one pass gives both: the maps are taken while it is traced
    maps = attention_metrics.attention_maps(
        session.model, session.anatomy, ids,
        lambda: traced.append(session.replayer.trace(Batch(ids, torch.ones_like(ids)), logits=False)[0]))
    ref.attention, ref.extras["attention_trace"] = maps, traced[0]  # both or neither


def _modified_attention(session: Session, ref: Reference, start: int) -> dict[int, torch.Tensor]:
    """The attention maps of the model as modified now: the blocks from `start` on replayed from
    the reference's attention trace (the blocks before it are the reference's own)."""
    trace = ref.extras["attention_trace"]
    replayed = attention_metrics.attention_maps(
        session.model, session.anatomy, trace.input_ids,
        lambda: session.replayer.run_from(trace, start, keep_states=False, head=False))
    return {**{block: m for block, m in ref.attention.items() if block < start}, **replayed}


def _add_divergence(divergence: DivergenceAccumulator, replayer, ref: Reference, number: int, batch,
                    final: torch.Tensor, temperature: float, head_changed: bool) -> None:
    """Add replayed batch `number` to `divergence`, from the states leaving its last block: when
    the probe left the reference's plain head alone, from the state entering it (summarise_head,
    kl_from_states); else the head run on them as Replayer.head_parts says."""
    plain = replayer.plain_head()
    reference = ref.logprobs[number]
    if plain is not None and reference.summary is not None and not head_changed and temperature == 1.0:
        head_input = replayer.head_input(final)
        divergence.add_from_states(reference, ref.next_logprob[number], head_input,
                                   summarise_head(head_input, *plain, batch.input_ids), batch.attention_mask)
        return
    for rows, logits in replayer.head_parts(final):
        if temperature != 1.0:
            logits = logits / temperature
        divergence.add(ref.logprobs[number].rows(rows), ref.next_logprob[number][rows], logits,
                       batch.input_ids[rows], batch.attention_mask[rows])


def _measure_whole_model(session, ref, data, plan, spec, mod, ctx, control, began, temperature) -> ProbeRecord:
    """A probe of a change made before the first block (the rotary embedding): whole forward
    passes of the evaluation batches, against the same reference, as `measure` replays them
    (padding masked for the modification, logits divided by the temperature)."""
    divergence = DivergenceAccumulator()
    with mod.applied(ctx, list(spec.targets)), torch.inference_mode():
        for number, batch in enumerate(data.eval_batches):
            control.checkpoint()
            with token_mask(ctx, batch.attention_mask):
                logits = session.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       use_cache=False).logits
            if temperature != 1.0:
                logits = logits / temperature
            divergence.add(ref.logprobs[number], ref.next_logprob[number], logits, batch.input_ids,
                           batch.attention_mask)
    metrics = divergence.summary()
    bleeding, level, reason = judge(metrics, mod.family, plan.threshold)
    return ProbeRecord(spec, metrics, bleeding, level, reason, seconds=control.clock() - began)


GENERATION_PROMPTS = 3  # continuations of the built-in prompts generated through the cache


def _cached_generation(session: Session, ref: Reference, control: RunControl) -> dict[str, float]:
    """KL over greedy continuations generated token by token through the KV cache, for a probe
    applied now, against the reference's steps (reference_cached_steps, computed before it was)."""
    control.checkpoint()
    continuations, steps = ref.extras["cached_steps"]
    return decoding_metrics.cached_generation_kl(steps, session.model, continuations)


def reference_cached_steps(session: Session, ref: Reference) -> None:
    """The unmodified model's greedy continuations of the first prompts and their step
    log-probabilities through the cache, kept on the reference."""
    if "cached_steps" not in ref.extras:
        continuations = decoding_metrics.reference_continuations(
            session.model, session.tokenizer, _decoding_prompts()[:GENERATION_PROMPTS])
        ref.extras["cached_steps"] = (continuations, [decoding_metrics.cached_step_logprobs(session.model, c)
                                                      for c in continuations])


def _knowledge_metrics(session: Session, ref: Reference, data: EvalData, spec: ProbeSpec, ctx, control: RunControl,
                       start_for, states: list | None = None, state_block: int | None = None) -> dict[str, float]:
    """Knowledge-probe accuracy of the model as modified now (against the reference's): the
    knowledge batches replayed from where `start_for(batch number)` says. With `states`, the
    states entering `state_block` are appended to it (for a later cumulative step)."""
    hits = []
    # A modified head sees every position, as deployed (int8 dynamic takes its range over
    # them all); an unmodified one need only run at the answer positions.
    head_modified = changes_head(session, spec)
    for number, batch in enumerate(data.knowledge_batches):
        control.checkpoint()
        mask = answer_positions_mask(tuple(batch.input_ids.shape), batch.answer_positions, batch.input_ids.device)
        with token_mask(ctx, batch.attention_mask):
            run = session.replayer.run_from(ref.knowledge_traces[number], *start_for(number),
                                            keep_states=states is not None, head_mask=None if head_modified else mask)
        answer_logits = run.logits[mask] if head_modified else run.logits
        hits += knowledge_correct_sparse(answer_logits, mask, batch.answer_positions, batch.answer_tokens)
        if states is not None:
            states.append(run.states[state_block])
    return {"knowledge_accuracy": sum(hits) / len(hits),
            "knowledge_ref": sum(ref.knowledge_hits) / len(ref.knowledge_hits)}


def score_knowledge(session: Session, ref: Reference, data: EvalData, plan: CheckupPlan, spec: ProbeSpec,
                    control: RunControl) -> dict[str, float]:
    """A measured probe's knowledge-probe accuracy, scored afterwards: its modification applied
    again, the knowledge batches replayed from its first modified block."""
    mod = create(spec.modification)
    ctx = session.mod_context(data, mod.needs_input_norms, control, mod.needs_gradients)
    fresh_embedding = any(mod.changes_embedding(session.anatomy, t) for t in spec.targets)

    def start_for(number: int) -> tuple[int, torch.Tensor | None]:
        if fresh_embedding:
            return 0, session.replayer.embed(ref.knowledge_traces[number])
        return (spec.block if plan.prefix_cache else 0), None

    with mod.applied(ctx, list(spec.targets)):
        return _knowledge_metrics(session, ref, data, spec, ctx, control, start_for)


def knowledge_choice(plan: CheckupPlan, records: list[ProbeRecord]) -> list[ProbeSpec]:
    """The probes whose knowledge a "worst" plan still has to score: per modification, its
    knowledge_top bleeding isolated probes of highest KL that were measured exactly (not
    decoding: those generate, they do not replay text), less those scored already (a resumed run)."""
    chosen: list[ProbeSpec] = []
    by_mod: dict[str, list[ProbeRecord]] = {}
    for record in records:
        if record.spec.mode == "isolated" and record.bleeding and not record.estimated \
                and record.spec.family != "decoding":
            by_mod.setdefault(record.spec.modification, []).append(record)
    for name in sorted(by_mod):
        worst = sorted(by_mod[name], key=lambda r: -r.score)[:plan.knowledge_top]
        chosen += [r.spec for r in worst if "knowledge_accuracy" not in r.metrics]
    return chosen


def probe_key(spec: ProbeSpec) -> tuple:
    """Probes with equal keys measure the same thing (e.g. an isolated block probe and the
    same block's sweep probe): one is measured, the others reuse it."""
    return (spec.modification, spec.targets)


AUTOSAVE_SECONDS = 5.0  # a killed run loses at most this much work


def run_checkup(session: Session, plan: CheckupPlan, data: EvalData, control: RunControl | None = None,
                resume: CheckupReport | None = None, autosave: Path | None = None) -> Iterator[Event]:
    """Yield events while probing; the last event is always Finished (with the report, also
    when cancelled: what was measured is kept). `resume`, an earlier report of the same plan
    on the same model and data, supplies the probes it measured. With `autosave`, the report
    so far is written there (checkup.json, atomically) every few seconds."""
    control = control or RunControl()
    began = time.monotonic()
    report = CheckupReport(model=session.summary.as_dict(), plan=plan.as_dict(), data=data.describe(), reference={})
    records: dict[int, ProbeRecord] = {}  # by probe index: estimated first, measured when measured
    saved_at = [time.monotonic()]

    def save(status: str | None = None, force: bool = False) -> None:
        report.probes = [records[i] for i in sorted(records)]
        if status:
            _finish(report, plan, status, began)
        if autosave is not None and (force or time.monotonic() - saved_at[0] >= AUTOSAVE_SECONDS):
            report.save(autosave)
            saved_at[0] = time.monotonic()

    try:
        probes, skipped = build_probes(plan, session.anatomy)
        report.plan["notes"] = list(skipped)  # what the plan left out and why, for the diagnosis
        for note in data.notes:
            yield LogMessage(note, "warning")
        treated = session.treatment.original is not None
        yield Stage("reference", f"{'treated' if treated else 'unmodified'} model on {data.eval_tokens} tokens")
        # The model as it is now: after a weight-changing treatment the probes must replay the
        # treated model's own states, so the reference is rebuilt for every weights_version.
        ref = session.current_reference(data, control)
        release_freed_memory()
        report.reference = dict(ref.figures)
        report.reference["weights_digest"] = session.weights_digest()
        routing_reference = routing_metrics.reference_routing(session, ref, data)
        if routing_reference is not None:  # on the evaluation text: which experts are (never) used
            report.reference["expert_usage"] = routing_reference.usage()
            report.reference["expert_targets"] = session.anatomy.expert_targets()
        if treated:
            report.reference["model"] = "treated: " + "; ".join(t["summary"] for t in session.treatment.applied)
        done_before = _resumable(resume, report) if resume is not None else {}
        exact = [p for p in probes if plan.exhaustive or not _estimated_first(p)]
        estimated = [p for p in probes if p not in exact]
        if any(create(p.modification).needs_input_norms for p in exact):
            yield Stage("calibration", f"activation norms on {data.calibration_tokens} calibration tokens")
            session.input_norms(data, control)
        if any(create(p.modification).needs_gradients for p in exact):
            yield Stage("calibration", f"loss gradients on {data.calibration_tokens} calibration tokens")
            session.gradient_norms(data, control)
        yield PlanReady(tuple(probes), tuple(skipped))
        for note in skipped:
            yield LogMessage(note)
        for spec in probes:  # what an earlier run measured stands
            if probe_key(spec) in done_before:
                records[spec.index] = dataclasses.replace(done_before[probe_key(spec)], spec=spec)
                yield ProbeResult(records[spec.index])
        if done_before:
            yield LogMessage(f"Resumed: {len(records)} of {len(probes)} probes were measured by the earlier run.")
        if estimated:
            yield from _estimate(session, ref, data, plan, estimated, records, control)
            verify = _to_verify(plan, estimated, records)
            yield LogMessage(_verification_note(plan, estimated, verify))
            exact = sorted(verify, key=lambda p: -records[p.index].score) + exact
        exact = [p for p in exact if not (p.index in records and not records[p.index].estimated)]
        save()
        firsts = {}
        for spec in exact:
            firsts.setdefault(probe_key(spec), spec)
        repeats = len(exact) - len(firsts)
        if repeats:
            yield LogMessage(f"{repeats} probes measure the same as another one (e.g. a sweep point and the "
                             "isolated probe of the same block); each is measured once.")
        carry = _CumulativeCarry(exact, session.anatomy, plan.prefix_cache)
        costs = [probe_cost(session.anatomy, p, plan.prefix_cache) if firsts[probe_key(p)] is p else 0.0
                 for p in exact]
        clock = ProbeClock()
        later = _knowledge_stage_costs(session, data, plan, probes)
        measured: dict[tuple, ProbeRecord] = {}
        total = len(probes)  # grows when settling adds probes to measure again, so `done` never goes back
        if len(exact) < total:  # estimated or resumed probes are done already
            yield Progress(total - len(exact), total, time.monotonic() - began, None)
        number = 0

        def progress() -> Progress:
            eta, spread = clock.remaining(list(zip(exact[number:], costs[number:])) + later)
            return Progress(total - len(exact) + number, total, time.monotonic() - began, eta,
                            eta_range=(spread.low, spread.high) if spread else None)

        while True:
            if number == len(exact):
                more, why = _to_settle(plan, estimated, records)
                if not more:
                    break
                yield LogMessage(_settling_note(plan, why))
                exact += more
                costs += [probe_cost(session.anatomy, p, plan.prefix_cache) for p in more]
                total += len(more)
                yield progress()
            spec, cost = exact[number], costs[number]
            number += 1
            control.checkpoint()
            yield ProbeStarted(spec)
            key = probe_key(spec)
            if key in measured:
                record = dataclasses.replace(measured[key], spec=spec, seconds=0.0)
            else:
                record = measured[key] = measure(session, ref, data, plan, spec, control, carry)
            if spec.index in records and records[spec.index].estimated:  # keep what stage 1 said
                record = dataclasses.replace(
                    record, metrics={**record.metrics, "kl_estimated": records[spec.index].score})
            records[spec.index] = record
            release_freed_memory()  # what the probe freed, before the next one allocates
            save()
            yield ProbeResult(record)
            clock.observe(spec, cost, record.seconds)
            yield progress()
        if later:
            yield from _score_worst_knowledge(session, ref, data, plan, records, control, save)
        if plan.context_lengths:
            yield from run_context_sweep(session, data, expand(plan.modifications), plan.context_lengths, control,
                                         report.context)
        save("completed", force=True)
        yield Finished("completed", f"{len(report.probes)} probes, {report.findings['bleeding_count']} bleeding",
                       report)
    except CancelledError as exc:
        save("cancelled", force=True)
        yield Finished("cancelled", str(exc), report)
    except ModelDoctorError as exc:
        save("failed", force=True)
        yield Failed(str(exc), model_restored=not isinstance(exc, ModelNotRestoredError))
        yield Finished("failed", str(exc), report)
    except Exception as exc:  # an engine bug must reach the user as a message, not kill the app
        save("failed", force=True)
        yield Failed(f"Unexpected error during the checkup: {exc}", traceback.format_exc())
        yield Finished("failed", str(exc), report)


def _knowledge_stage_costs(session: Session, data: EvalData, plan: CheckupPlan,
                           probes: list[ProbeSpec]) -> list[tuple[ProbeSpec, float]]:
    """The final knowledge stage of a "worst" plan as (spec, cost) pairs for the ETA, at most:
    knowledge_top scorings per modification, each a replay of the knowledge batches from a block
    halfway down (which probes bleed most is known only at the end)."""
    if not data.knowledge_batches:
        return []
    text = sum(b.input_ids.numel() for b in data.eval_batches) or 1
    ratio = sum(b.input_ids.numel() for b in data.knowledge_batches) / text
    pairs = []
    for isolated in knowledge_stage_probes(plan, probes).values():
        middle = isolated[len(isolated) // 2]
        cost = probe_cost(session.anatomy, middle, plan.prefix_cache) * ratio
        pairs += [(middle, cost)] * min(plan.knowledge_top, len(isolated))
    return pairs


def _score_worst_knowledge(session, ref, data, plan, records, control, save) -> Iterator[Event]:
    """The knowledge stage of a "worst" plan: the knowledge probes on each modification's most
    damaging bleeding probes, their records updated and sent again."""
    chosen = knowledge_choice(plan, [records[i] for i in sorted(records)])
    if not chosen:
        return
    yield Stage("knowledge", f"knowledge probes on the {len(chosen)} most damaging bleeding probes (at most "
                             f"{plan.knowledge_top} per modification)")
    began = control.clock()
    for number, spec in enumerate(chosen, 1):
        control.checkpoint()
        yield ProbeStarted(spec)
        started = control.clock()
        extra = score_knowledge(session, ref, data, plan, spec, control)
        record = records[spec.index]
        spent_here = control.clock() - started
        records[spec.index] = dataclasses.replace(record, metrics={**record.metrics, **extra},
                                                  seconds=record.seconds + spent_here,
                                                  knowledge_seconds=record.knowledge_seconds + spent_here)
        save()
        yield ProbeResult(records[spec.index])
        spent = control.clock() - began
        yield Progress(number, len(chosen), spent, spent / number * (len(chosen) - number), stage="knowledge")


def _estimated_first(spec: ProbeSpec) -> bool:
    return spec.mode == "isolated" and estimable(create(spec.modification))


def fewest_exact_probes(plan: CheckupPlan, probes: list[ProbeSpec]) -> int:
    """How many probes a run of `plan` measures exactly at the least (before the estimates say
    how many come near the threshold): for the time estimate shown before a run."""
    if plan.exhaustive:
        return len(probes)
    per_mod: dict[str, int] = {}
    exact = 0
    for spec in probes:
        if _estimated_first(spec):
            per_mod[spec.modification] = per_mod.get(spec.modification, 0) + 1
        else:
            exact += 1
    return exact + sum(min(n, plan.verify_top + plan.control_sample) for n in per_mod.values())


def _estimate(session, ref, data, plan, estimated, records, control) -> Iterator[Event]:
    """Stage 1: every estimable probe's estimate, as one ProbeResult each."""
    wanted = [p for p in estimated if p.index not in records]
    if not wanted:
        return
    yield Stage("estimate", f"{len(wanted)} probes at once, from one backward pass per batch "
                            f"({data.eval_tokens} tokens)")
    by_mod: dict[str, list[str]] = {}
    for spec in wanted:
        by_mod.setdefault(spec.modification, []).append(spec.targets[0])
    began = control.clock()
    figures = estimate_kl(session, ref, data, by_mod, control)
    seconds = (control.clock() - began) / len(wanted)
    for spec in wanted:
        kl = figures[(spec.modification, spec.targets[0])]
        bleeding, level, reason = judge({"kl_mean": kl}, spec.family, plan.threshold)
        records[spec.index] = ProbeRecord(spec, {"kl_mean": kl}, bleeding, level, "estimated " + reason,
                                          seconds=seconds, basis="estimated")
        yield ProbeResult(records[spec.index])


def _per_modification(specs: list[ProbeSpec]) -> dict[str, list[ProbeSpec]]:
    """The probes grouped by modification, each group in the order given."""
    groups: dict[str, list[ProbeSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.modification, []).append(spec)
    return groups


def _to_verify(plan: CheckupPlan, estimated: list[ProbeSpec], records: dict[int, ProbeRecord]) -> list[ProbeSpec]:
    """Stage 2's probes: per modification, those estimated at or above verify_fraction of the
    threshold, at least the verify_top highest, and control_sample of the rest at random (so
    the estimator's agreement is also checked where it says all is well)."""
    import random

    chosen: list[ProbeSpec] = []
    picker = random.Random(0)
    for name, specs in _per_modification(estimated).items():
        ranked = sorted(specs, key=lambda p: -records[p.index].score)
        top = [p for i, p in enumerate(ranked)
               if i < plan.verify_top or records[p.index].score >= plan.verify_fraction * plan.threshold]
        rest = ranked[len(top):]
        chosen += top + picker.sample(rest, min(plan.control_sample, len(rest)))
    return chosen


def _to_settle(plan: CheckupPlan, estimated: list[ProbeSpec], records: dict[int, ProbeRecord]
               ) -> tuple[list[ProbeSpec], list[tuple[str, float, str, int]]]:
    """Probes still only estimated that could, by the estimator's own record, belong among the
    verify_top highest or bleed, and why: (the probes, highest estimate first; per modification
    that adds some, (modification, the ratio, the probe it was seen on, how many)).

    Per modification, each verified probe says by how much the estimate ran low there (measured
    / estimated); every estimate that, scaled by the largest such ratio, reaches the
    verify_top-th highest figure or the threshold is measured too (the threshold only as far as
    the plan verifies near it: times verify_fraction where that is above 1). Only probes
    estimated at a tenth of that cutoff or more give a ratio: a tiny estimate of a random
    control against a tiny measured figure says little, and would send everything to be
    measured. Called again after those are measured, until it adds nothing, so the top of the
    ranking and the verdicts near the threshold rest on measured figures. On the sample the
    estimate ran up to 3.6x low (an int3 key projection), and the first round alone missed 3 of the
    int4 top 10 and judged one int3 value projection not bleeding that bleeds."""
    more: list[ProbeSpec] = []
    why = []
    for name, specs in _per_modification(estimated).items():
        scores = sorted((records[p.index].score for p in specs), reverse=True)
        cutoff = plan.threshold * max(1.0, plan.verify_fraction)
        if plan.verify_top:
            cutoff = min(cutoff, scores[min(plan.verify_top, len(scores)) - 1])
        ratios = [(records[p.index].score / records[p.index].metrics["kl_estimated"], p) for p in specs
                  if not records[p.index].estimated and records[p.index].metrics.get("kl_estimated", 0) >= cutoff / 10
                  and records[p.index].metrics["kl_estimated"] > 0]
        if not ratios:
            continue
        ratio, seen_on = max(ratios, key=lambda pair: pair[0])
        low_by = max(1.0, ratio)
        added = [p for p in specs if records[p.index].estimated and records[p.index].score * low_by >= cutoff]
        if added:
            more += added
            why.append((name, ratio, seen_on.target, len(added)))
    return sorted(more, key=lambda p: -records[p.index].score), why


def _settling_note(plan: CheckupPlan, why: list[tuple[str, float, str, int]]) -> str:
    parts = []
    for name, ratio, target, added in why:
        where = f"block {target}" if target.isdigit() else target
        seen = (f"measured up to {ratio:.1f}× the estimate, on {where}" if ratio > 1
                else "measured at or below the estimates")
        parts.append(f"{name}: {added} more ({seen})")
    return ("Measuring the probes whose estimates, scaled by how far their modification's measured probes ran "
            f"above their estimates, could still reach its top {plan.verify_top} or the threshold: "
            + "; ".join(parts) + ".")


def _verification_note(plan: CheckupPlan, estimated: list[ProbeSpec], verify: list[ProbeSpec]) -> str:
    return (f"Estimated {len(estimated)} probes; measuring {len(verify)} of them exactly: per modification, every "
            f"one estimated at {plan.verify_fraction:g}× the threshold or more, at least the top {plan.verify_top}, "
            f"and {plan.control_sample} others at random as a check. The others stay marked as estimated "
            "(--exhaustive measures them all).")


def _resumable(resume: CheckupReport, report: CheckupReport) -> dict[tuple, ProbeRecord]:
    """The measured probes of `resume`, if it is a run of the same plan on the same weights and data."""
    # A plan saved by an older version lacks newer fields: it is read as they default; so are the
    # model card's newer fields (the block kinds), and the plan's notes are not the plan.
    theirs_plan = CheckupPlan.from_dict(resume.plan).as_dict()
    ours_model = {k: v for k, v in report.model.items() if k in resume.model}
    for what, theirs, ours in (("plan", theirs_plan, CheckupPlan.from_dict(report.plan).as_dict()),
                               ("evaluation data", resume.data, report.data), ("model", resume.model, ours_model)):
        if json.loads(json.dumps(theirs)) != json.loads(json.dumps(ours)):
            raise PlanError(f"The checkup to resume was run with a different {what}; start a new checkup instead.")
    if resume.reference.get("weights_digest") != report.reference.get("weights_digest"):
        raise PlanError("The checkup to resume was run on different weights (the model or its treatment changed); "
                        "start a new checkup instead.")
    return {probe_key(r.spec): r for r in resume.probes if not r.estimated}


def _finish(report: CheckupReport, plan: CheckupPlan, status: str, began: float) -> None:
    report.probes = flag_outliers(report.probes, plan.threshold, plan.outlier_k)
    report.findings = findings(report.probes, plan.threshold)
    report.status = status
    report.elapsed_s = time.monotonic() - began


def checkup(session: Session, plan: CheckupPlan, data: EvalData, control: RunControl | None = None,
            resume: CheckupReport | None = None) -> CheckupReport:
    """Run to the end and return the report; raises on failure or cancel."""
    return run_to_end(run_checkup(session, plan, data, control, resume))


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
