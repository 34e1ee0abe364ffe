import csv
import json

import numpy as np
import pytest

from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.checkup.run import checkup, run_checkup
from modeldoctor.checkup.verdict import flag_outliers, judge, knee
from modeldoctor.control import RunControl
from modeldoctor.events import Finished, PlanReady, Progress, ProbeResult, ProbeStarted, Stage
from modeldoctor.report import CheckupReport
from modeldoctor.report.results import ProbeRecord, ProbeSpec

SEVERITIES = ["healthy", "mild", "moderate", "severe"]


def test_event_stream_and_report(llama_session, small_data_spec):
    plan = CheckupPlan(modifications=["int8-dynamic", "int2", "remove"], exhaustive=True, knowledge_on="all")
    events = list(run_checkup(llama_session, plan, llama_session.data(small_data_spec)))
    assert isinstance(events[0], Stage)
    ready = next(e for e in events if isinstance(e, PlanReady))
    assert len(ready.probes) == 9
    started = [e for e in events if isinstance(e, ProbeStarted)]
    results = [e for e in events if isinstance(e, ProbeResult)]
    progress = [e for e in events if isinstance(e, Progress)]
    assert len(started) == len(results) == len(progress) == 9
    assert progress[-1].done == 9 and progress[-1].eta_s == pytest.approx(0.0, abs=1e-6)
    assert all(p.eta_s is not None and p.eta_s >= 0 for p in progress)
    final = events[-1]
    assert isinstance(final, Finished) and final.reason == "completed"
    report = final.report
    assert [p.spec for p in report.probes] == list(ready.probes)
    for record in report.probes:
        assert set(["kl_mean", "kl_median", "kl_p90", "kl_p99", "kl_max", "kl_stderr", "same_top",
                    "delta_p_rms", "ppl", "ppl_ratio", "knowledge_accuracy"]) <= set(record.metrics)
        # The bleeding rule, read off each probe's own figure: above the threshold it bleeds; at
        # or below it, only as a robust outlier among its peers.
        kl = record.metrics["kl_mean"]
        if kl > plan.threshold:
            assert record.bleeding and record.severity != "healthy", record
        else:
            assert record.reason.startswith("outlier") if record.bleeding else record.severity == "healthy"
    # Severity never falls as the KL rises (outliers aside, which are flagged "mild" by rank).
    ranks = [SEVERITIES.index(r.severity) for r in sorted(report.probes, key=lambda r: r.metrics["kl_mean"])
             if not r.reason.startswith("outlier")]
    assert ranks == sorted(ranks) and ranks[-1] > 0
    worst = report.ranked()[0]
    assert worst.spec.modification in ("int2", "remove")


def test_cancel_between_probes_restores_model(llama_session, small_data_spec):
    before = llama_session.weights_digest()
    control = RunControl()
    seen = []
    for event in run_checkup(llama_session, CheckupPlan(modifications=["int4", "remove"], exhaustive=True),
                             llama_session.data(small_data_spec), control):
        seen.append(event)
        if isinstance(event, ProbeResult) and len([e for e in seen if isinstance(e, ProbeResult)]) == 2:
            control.cancel()
    assert seen[-1].reason == "cancelled"
    assert len(seen[-1].report.probes) == 2
    assert llama_session.weights_digest() == before


class CancelAfter(RunControl):
    """Cancels at the n-th checkpoint: that lands inside a probe, between batches."""

    def __init__(self, n):
        super().__init__()
        self.remaining = n

    def checkpoint(self):
        self.remaining -= 1
        if self.remaining == 0:
            self.cancel()
        super().checkpoint()


@pytest.mark.parametrize("modification", ["int2", "remove", "prune-wanda-50"])
def test_cancel_inside_a_probe_restores_model(llama_session, small_data_spec, modification):
    data = llama_session.data(small_data_spec)
    llama_session.reference(data)
    llama_session.input_norms(data)
    before = llama_session.weights_digest()
    events = list(run_checkup(llama_session, CheckupPlan(modifications=[modification]), data, CancelAfter(3)))
    assert events[-1].reason == "cancelled"
    assert llama_session.weights_digest() == before


def test_a_failed_run_says_whether_the_model_was_restored(llama_session, small_data_spec, monkeypatch):
    from modeldoctor.checkup import run as checkup_run
    from modeldoctor.errors import ModelNotRestoredError, PlanError
    from modeldoctor.events import Failed

    data = llama_session.data(small_data_spec)
    plan = CheckupPlan(modifications=["int2"], knowledge=False)
    for error, restored in ((PlanError("no such block"), True), (ModelNotRestoredError("load it again"), False)):
        def broken(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(checkup_run, "measure", broken)
        failed = [e for e in run_checkup(llama_session, plan, data) if isinstance(e, Failed)]
        assert len(failed) == 1 and failed[0].model_restored is restored


def test_closing_the_generator_mid_probe_restores_model(llama_session, small_data_spec):
    before = llama_session.weights_digest()
    events = run_checkup(llama_session, CheckupPlan(modifications=["int2"]), llama_session.data(small_data_spec))
    for event in events:
        if isinstance(event, ProbeStarted):
            break
    events.close()
    assert llama_session.weights_digest() == before


@pytest.mark.parametrize("scope, modes", [("blocks", ("isolated", "cumulative")), ("linears", ("cumulative",))])
def test_prefix_cache_gives_the_same_numbers(llama_session, small_data_spec, scope, modes):
    data = llama_session.data(small_data_spec)
    # Knowledge on every bleeding probe as it runs: a cumulative step carries its knowledge states too.
    cached = checkup(llama_session, CheckupPlan(modifications=["int3"], scope=scope, modes=modes,
                                                knowledge_on="bleeding"), data)
    full = checkup(llama_session, CheckupPlan(modifications=["int3"], scope=scope, modes=modes,
                                              prefix_cache=False, knowledge_on="bleeding"), data)
    for a, b in zip(cached.probes, full.probes):
        assert a.spec == b.spec
        assert a.metrics["kl_mean"] == pytest.approx(b.metrics["kl_mean"], rel=1e-4, abs=1e-7)
        assert a.metrics["knowledge_accuracy"] == b.metrics["knowledge_accuracy"]


def test_linear_scope_and_sweep_plan(llama_session):
    probes, skipped = build_probes(CheckupPlan(modifications=["int4", "remove"], scope="linears"),
                                   llama_session.anatomy)
    assert sum(p.modification == "int4" for p in probes) == 22  # 21 block linears and the head
    assert any("blocks only" in s for s in skipped)
    probes, _ = build_probes(CheckupPlan(modifications=["bits-sweep"], modes=("sweep",)), llama_session.anatomy)
    assert len(probes) == 5 * (1 + 3)


def test_sweep_reports_a_knee(llama_session, small_data_spec):
    report = checkup(llama_session, CheckupPlan(modifications=["bits-sweep"], modes=("sweep",), knowledge=False),
                     llama_session.data(small_data_spec))
    curve = report.findings["sweeps"]["int-channel-sym"]
    assert curve["strengths"] == [8, 6, 4, 3, 2]
    assert curve["scores"][-1] > curve["scores"][0]
    assert curve["first_bleeding"] in (6, 4, 3, 2)
    assert set(curve["blocks"]) == {"0", "1", "2"}


def test_decoding_probes(llama_session, small_data_spec):
    report = checkup(llama_session, CheckupPlan(modifications=["decode-rep-1.0", "decode-temp-3.0"]),
                     llama_session.data(small_data_spec))
    same, hot = report.probes
    assert same.metrics["token_agreement"] == 1.0 and same.metrics["kl_trajectory"] == pytest.approx(0, abs=1e-6)
    assert hot.metrics["token_agreement"] < 0.5 and hot.bleeding
    assert hot.samples and {"prompt", "reference", "modified"} <= set(hot.samples[0])


def test_report_roundtrip(llama_session, small_data_spec, tmp_path):
    report = checkup(llama_session, CheckupPlan(modifications=["int2", "remove"], modes=("isolated", "cumulative")),
                     llama_session.data(small_data_spec))
    path = report.save(tmp_path / "out")
    loaded = CheckupReport.load(tmp_path / "out")
    assert loaded.to_dict() == json.loads(path.read_text())
    # What comes back is the run's own report, figure for figure (NaN, stored as null, stays NaN-like).
    assert len(loaded.probes) == len(report.probes)
    for back, run in zip(loaded.probes, report.probes):
        assert (back.spec, back.bleeding, back.severity, back.reason) == (run.spec, run.bleeding, run.severity,
                                                                          run.reason)
        assert back.metrics == pytest.approx(run.metrics, nan_ok=True)
        for kind in ("cascade", "attention"):
            mine, theirs = getattr(back, kind), getattr(run, kind)
            assert set(mine) == set(theirs)
            for key in theirs:
                np.testing.assert_array_equal(np.array(mine[key], dtype=float), np.array(theirs[key], dtype=float))
    # The CSV, read back with the csv module, holds one row per probe with its target, verdict and KL.
    with open(tmp_path / "out" / "checkup.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report.probes)
    for row, run in zip(rows, report.probes):
        assert row["modification"] == run.spec.modification and row["targets"] == " ".join(run.spec.targets)
        assert row["bleeding"] == str(run.bleeding) and row["severity"] == run.severity
        assert float(row["kl_mean"]) == pytest.approx(run.metrics["kl_mean"], rel=1e-12)


def _record(index, kl, mode="isolated"):
    spec = ProbeSpec(index, "int8-dynamic", "quantize", mode, (str(index),), index)
    return ProbeRecord(spec, {"kl_mean": kl}, *judge({"kl_mean": kl}, "quantize", 0.01)[:3])


def test_outlier_rule_flags_a_spike_below_threshold():
    records = [_record(i, kl) for i, kl in enumerate([0.001, 0.0012, 0.0009, 0.0011, 0.008, 0.001])]
    flagged = flag_outliers(records, threshold=0.01, k=5)
    assert [r.bleeding for r in flagged] == [False, False, False, False, True, False]
    assert flagged[4].reason.startswith("outlier")


def test_outlier_rule_ignores_noise_on_a_healthy_model():
    records = [_record(i, kl) for i, kl in enumerate([1e-5, 2e-5, 1e-5, 1.5e-5, 9e-5])]
    assert not any(r.bleeding for r in flag_outliers(records, 0.01, 5))


def test_knee():
    curve = knee([8, 6, 4, 3, 2], [0.001, 0.003, 0.02, 0.3, 3.0], 0.01, descending=True)
    assert curve["last_safe"] == 6 and curve["first_bleeding"] == 4 and curve["knee"] == 3
    curve = knee([0.1, 0.5, 0.9], [0.001, 0.005, 0.5], 0.01, descending=False)
    assert curve["last_safe"] == 0.5 and curve["knee"] == 0.9


def test_severity_levels():
    assert judge({"kl_mean": 0.005}, "quantize", 0.01)[1] == "healthy"
    assert judge({"kl_mean": 0.02}, "quantize", 0.01)[1] == "mild"
    assert judge({"kl_mean": 0.2}, "quantize", 0.01)[1] == "moderate"
    assert judge({"kl_mean": 1.0}, "quantize", 0.01)[1] == "severe"


def test_kl_is_exact_past_the_memory_budget(llama_session, small_data_spec, monkeypatch):
    """Past the memory budget the reference goes to disk; KL must not change (it used to
    become a top-256 lower bound, 35 % low on a flat vocabulary)."""
    import modeldoctor.metrics.divergence as divergence
    from modeldoctor.session import Session

    plan = CheckupPlan(modifications=["int3"], knowledge=False)
    in_memory = checkup(llama_session, plan, llama_session.data(small_data_spec))
    assert in_memory.reference["reference_storage"] == "memory"
    monkeypatch.setattr(divergence, "FULL_REFERENCE_BYTES", 0)
    fresh = Session(llama_session.loaded)
    on_disk = checkup(fresh, plan, fresh.data(small_data_spec))
    assert on_disk.reference["reference_storage"] == "disk"
    for a, b in zip(in_memory.probes, on_disk.probes):
        assert b.metrics["kl_mean"] == pytest.approx(a.metrics["kl_mean"], rel=1e-6)
        assert b.metrics["kl_max"] == pytest.approx(a.metrics["kl_max"], rel=1e-6)


def _count_block_calls(session):
    """Forward hooks counting how many times any block runs; returns (counter, remove)."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1
    handles = [b.register_forward_hook(hook) for b in session.anatomy.block_list]
    return calls, lambda: [h.remove() for h in handles]


def test_cumulative_steps_resume_at_the_newest_target(llama_session, small_data_spec):
    """Step k starts from step k-1's states at target k's block: a 3-block scan runs
    3 + 2 + 1 block calls per batch, not 3 + 3 + 3, and gives the uncached numbers."""
    data = llama_session.data(small_data_spec)
    llama_session.current_reference(data)
    plan = CheckupPlan(modifications=["int3"], modes=("cumulative",), knowledge=False, attention=False)
    calls, remove = _count_block_calls(llama_session)
    try:
        cached = checkup(llama_session, plan, data)
    finally:
        remove()
    assert calls[0] == 6 * len(data.eval_batches)
    plan.prefix_cache = False
    full = checkup(llama_session, plan, data)
    for a, b in zip(cached.probes, full.probes):
        assert a.metrics["kl_mean"] == pytest.approx(b.metrics["kl_mean"], rel=1e-4, abs=1e-7)


def test_identical_probes_are_measured_once(llama_session, small_data_spec):
    """Block-scope isolated + sweep: each sweep-block probe is the isolated probe of the same
    block; it is reused, not re-run."""
    data = llama_session.data(small_data_spec)
    llama_session.current_reference(data)
    plan = CheckupPlan(modifications=["int4"], modes=("isolated", "sweep"), knowledge=False, attention=False,
                       exhaustive=True)
    calls, remove = _count_block_calls(llama_session)
    try:
        report = checkup(llama_session, plan, data)
    finally:
        remove()
    assert len(report.probes) == 7  # 3 isolated, 1 whole model, 3 sweep points
    assert calls[0] == (3 + 2 + 1 + 3) * len(data.eval_batches)  # 4 distinct probes
    isolated = {p.spec.targets: p.score for p in report.probes if p.spec.mode == "isolated"}
    for probe in report.probes:
        if probe.spec.mode == "sweep-block":
            assert probe.score == isolated[probe.spec.targets]


def test_checkup_after_a_weight_changing_treatment_replays_the_treated_model(llama_session, small_data_spec):
    """With Wanda-50 baked in, the prefix cache must replay the treated model's own states:
    prefix on and off agree, and the reference says it is the treated model."""
    from modeldoctor.treatment.pruning import bake

    data = llama_session.data(small_data_spec)
    checkup(llama_session, CheckupPlan(modifications=["int4"], knowledge=False), data)  # caches a reference
    llama_session.begin_weight_treatment()
    bake(llama_session, "prune-wanda-50", data)
    llama_session.weights_changed(function_preserving=False)
    llama_session.treatment.applied.append({"name": "prune-grad", "summary": "Wanda pruning to 50%"})
    plan = CheckupPlan(modifications=["int4"], knowledge=True, knowledge_on="all")
    cached = checkup(llama_session, plan, data)
    plan.prefix_cache = False
    full = checkup(llama_session, plan, data)
    assert cached.reference["model"].startswith("treated")
    for a, b in zip(cached.probes, full.probes):
        assert a.metrics["kl_mean"] == pytest.approx(b.metrics["kl_mean"], rel=1e-4, abs=1e-7)
        assert a.metrics["knowledge_accuracy"] == b.metrics["knowledge_accuracy"]
    llama_session.reset_treatments()
    again = checkup(llama_session, plan, data)
    assert "model" not in again.reference


def test_every_report_says_which_text_its_figures_are_on(llama_session, small_data_spec):
    data = llama_session.data(small_data_spec)
    plan = CheckupPlan(modifications=["int4"], knowledge=False, targets=["0"])
    on_eval = checkup(llama_session, plan, data)
    on_selection = checkup(llama_session, plan, data.selection_view())
    assert "evaluation split of the built-in text" in on_eval.measured_on()
    assert "selection split" in on_selection.measured_on()
    assert on_selection.reference["tokens"] == data.selection_tokens
    assert on_selection.probes[0].score != on_eval.probes[0].score  # other tokens, other figure


def test_diagnosis_names_the_safest_blocks_and_reads_kl_plainly():
    from modeldoctor.checkup.diagnosis import diagnose, kl_plain_reading
    from modeldoctor.checkup.verdict import judge
    from modeldoctor.report.results import CheckupReport, ProbeRecord, ProbeSpec

    def record(index, target, kl, same_top):
        bleeding, level, reason = judge({"kl_mean": kl}, "structure", 0.01)
        return ProbeRecord(ProbeSpec(index, "remove", "structure", "isolated", (target,), int(target)),
                           {"kl_mean": kl, "same_top": same_top}, bleeding, level, reason)

    probes = [record(i, str(i), kl, top) for i, (kl, top) in
              enumerate([(0.5, 0.6), (0.004, 0.99), (0.012, 0.95), (0.009, 0.96), (0.011, 0.94), (0.2, 0.7)])]
    report = CheckupReport(model={"name": "tiny"}, plan={"threshold": 0.01}, data={}, reference={},
                           probes=probes, findings={"threshold": 0.01})
    text = next(f.text for f in diagnose(report) if f.title.startswith("remove"))
    assert "Safest blocks to remove: 1 (KL 0.004), 3 (KL 0.009), 4 (KL 0.011) (the later ones bleed too)." in text
    reading = kl_plain_reading(report, 0.01)
    assert reading is not None and "5% of next-token top choices change" in reading and "3 measured" in reading
    assert kl_plain_reading(report, 10.0) is None  # nothing measured near it: no made-up reading


def test_outliers_are_judged_among_all_figures_estimates_included():
    """A two-stage checkup measures mostly the top of the ranking: judged among those alone, a
    measured probe well above its peers' typical figure would not stand out. Estimates count
    for the median and the spread, and an estimate that stands out is flagged as an estimated
    outlier."""
    from dataclasses import replace

    measured = [_record(i, kl) for i, kl in enumerate([0.006, 0.007, 0.0065, 0.008])]
    typical = [0.001 + 0.00005 * (i % 5) for i in range(20)]
    estimated = [replace(_record(4 + i, kl), basis="estimated", reason="estimated")
                 for i, kl in enumerate(typical + [0.0045])]
    flagged = flag_outliers(measured + estimated, threshold=0.01, k=5)
    assert [r.bleeding for r in flagged] == [True] * 4 + [False] * 20 + [True]
    assert flagged[0].reason.startswith("outlier") and flagged[-1].reason.startswith("estimated outlier")
    assert not any(r.bleeding for r in flag_outliers(measured, threshold=0.01, k=5))  # among themselves: none
