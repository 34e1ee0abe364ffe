"""Mixtures of experts: anatomy, expert and routing probes, routing metrics, checkups over the
experts scope, on tiny random Mixtral, Qwen2-MoE and OLMoE models."""

import json

import numpy as np
import pytest
import torch

from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.checkup.run import checkup
from modeldoctor.errors import PlanError
from modeldoctor.modifications.base import create
from modeldoctor.session import Session
from tiny_models import MOE_CONFIGS

MOE_FAMILIES = sorted(MOE_CONFIGS)
ROUTING_PROBES = ["router-noise-0.5", "topk-minus1", "topk-plus1", "drop-least-used", "router-int4"]


@pytest.fixture(scope="module")
def sessions(moe_dirs):
    return {family: Session.open(path) for family, path in moe_dirs.items()}


def _logits(session, ids):
    with torch.inference_mode():
        return session.model(input_ids=ids, use_cache=False).logits.clone()


def _ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_anatomy_finds_router_experts_and_shared_experts(sessions, family):
    anatomy = sessions[family].anatomy
    assert len(anatomy.moe_blocks()) == 3
    for part in anatomy.blocks:
        moe = part.moe
        assert moe.num_experts == 4 and moe.top_k == 2
        router = part.linears[moe.router]
        assert router.out_features == 4 and router.in_features == anatomy.hidden_size
        for expert, linears in moe.experts.items():
            assert len(linears) == 3 and all(n.startswith(expert + ".") for n in linears)
        assert part.mlp_down is None  # a routed sum has no single down projection
        assert set(moe.shared) == ({"mlp.shared_expert"} if family == "qwen2_moe" else set())
    targets = anatomy.expert_targets()
    assert len(targets) == 3 * (1 + 4 + (family == "qwen2_moe"))
    expert = next(t for t in targets if t.endswith("experts.1"))
    assert anatomy.expert_linears(expert) == [f"{expert}.{n.rsplit('.', 1)[1]}"
                                              for n in anatomy.blocks[0].moe.experts[expert.split(".", 1)[1]]]


def test_dense_model_has_no_experts(llama_session):
    anatomy = llama_session.anatomy
    assert anatomy.moe_blocks() == [] and anatomy.expert_targets() == []
    with pytest.raises(PlanError, match="no MoE blocks"):
        build_probes(CheckupPlan(modifications=["int4"], scope="experts"), anatomy)
    with pytest.raises(PlanError, match="applies to no block"):
        build_probes(CheckupPlan(modifications=["topk-minus1"]), anatomy)
    probes, skipped = build_probes(CheckupPlan(modifications=["int4", "router-noise-0.5"]), anatomy)
    assert len(probes) == 3 and any("router-noise-0.5 applies to no block" in s for s in skipped)
    for name in ROUTING_PROBES + ["drop-expert"]:  # applied anyway: a clear message, nothing changed
        digest = llama_session.weights_digest()
        with pytest.raises(PlanError, match="needs a mixture-of-experts block"):
            with create(name).applied(llama_session.mod_context(), ["1"]):
                pass
        assert llama_session.weights_digest() == digest


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("name, target", [(n, "1") for n in ROUTING_PROBES] + [
    ("int4", "1.EXPERT"), ("prune-wanda-50", "1.EXPERT"), ("drop-expert", "1.EXPERT"), ("int2", "1.ROUTER")])
def test_each_moe_probe_changes_the_output_and_restores_bit_exact(sessions, small_data_spec, family, name, target):
    session = sessions[family]
    moe = session.anatomy.blocks[1].moe
    target = target.replace("EXPERT", list(moe.experts)[0]).replace("ROUTER", moe.router)
    data = session.data(small_data_spec)
    ids = _ids()
    before, digest, k = _logits(session, ids), session.weights_digest(), moe.top_k
    mod = create(name)
    assert mod.applies_to(session.anatomy, target)
    ctx = session.mod_context(data, mod.needs_input_norms)
    with mod.applied(ctx, [target]):
        during = _logits(session, ids)
    assert not torch.equal(during, before), f"{name} @ {target} changed nothing"
    assert torch.equal(_logits(session, ids), before) and session.weights_digest() == digest and moe.top_k == k
    with pytest.raises(RuntimeError, match="boom"):  # restored after an exception too
        with mod.applied(ctx, [target]):
            raise RuntimeError("boom")
    assert torch.equal(_logits(session, ids), before) and moe.top_k == k


def test_drop_least_used_drops_the_expert_least_used_on_calibration_text(sessions, small_data_spec):
    session = sessions["olmoe"]
    data = session.data(small_data_spec)
    usage = session.expert_usage(data)
    mod = create("drop-least-used")
    dropped = mod.dropped(session.mod_context(data), ["0", "2"])
    assert dropped == {0: [int(np.argmin(usage[0]))], 2: [int(np.argmin(usage[2]))]}
    assert all(u.sum() == 2 * sum(int(b.attention_mask.sum()) for b in data.calibration_batches) for u in usage.values())


def test_routing_metrics_on_a_hand_checkable_case(sessions, small_data_spec):
    """Dropping expert e of block b: exactly the tokens the reference sent to e change experts
    there (so block b's flip rate is e's usage), e then receives nothing, and nothing changes
    upstream; the unmodified model flips nothing."""
    session = sessions["mixtral"]
    data = session.data(small_data_spec)
    moe = session.anatomy.blocks[1].moe
    expert = f"1.{list(moe.experts)[2]}"
    plan = CheckupPlan(modifications=["drop-expert", "none"], scope="experts", knowledge=False, exhaustive=True,
                       targets=[expert])
    report = checkup(session, plan, data)
    dropped, unchanged = report.probes
    usage = np.asarray(report.reference["expert_usage"]["1"])
    assert usage.sum() == pytest.approx(2.0)  # each token goes to k = 2 experts
    routing = dropped.routing
    assert routing["blocks"] == [0, 1, 2]
    assert routing["flip_rate"][0] == 0.0  # upstream of the change
    assert routing["flip_rate"][1] == pytest.approx(usage[2]) and usage[2] > 0
    assert routing["load_modified"][1][2] == 0.0
    assert routing["load_original"][1] == pytest.approx(usage.tolist())
    assert sum(routing["load_modified"][1]) == pytest.approx(2.0)  # still k experts per token
    assert dropped.metrics["routing_flip_rate"] >= routing["flip_rate"][1] > 0
    assert dropped.metrics["kl_mean"] > 0 and dropped.metrics["load_shift"] > 0
    assert unchanged.metrics["routing_flip_rate"] == 0.0 and unchanged.metrics["kl_mean"] == 0.0
    assert unchanged.routing["load_modified"] == unchanged.routing["load_original"]


def test_topk_flips_are_counted_at_the_trained_k(sessions, small_data_spec):
    """One expert more per token: the block's own routes at the trained k stay, so its flips are
    0, but its load counts k+1 experts per token; later blocks see changed states."""
    session = sessions["qwen2_moe"]
    data = session.data(small_data_spec)
    report = checkup(session, CheckupPlan(modifications=["topk-plus1"], knowledge=False, targets=["0"]), data)
    routing = report.probes[0].routing
    assert routing["flip_rate"][0] == 0.0 and sum(routing["load_modified"][0]) == pytest.approx(3.0)
    assert max(routing["flip_rate"][1:]) > 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_scope_checkup_end_to_end(sessions, small_data_spec, family):
    session = sessions[family]
    data = session.data(small_data_spec)
    digest = session.weights_digest()
    plan = CheckupPlan(modifications=["int4", "router-noise-0.5", "drop-expert"], scope="experts", knowledge=False)
    report = checkup(session, plan, data)
    assert report.status == "completed" and session.weights_digest() == digest
    anatomy = session.anatomy
    int4 = [p for p in report.probes if p.spec.modification == "int4"]
    assert [p.spec.targets[0] for p in int4] == anatomy.expert_targets()
    assert [p.spec.target for p in report.probes if p.spec.modification == "router-noise-0.5"] == ["0", "1", "2"]
    assert all("routing_flip_rate" in p.metrics for p in report.probes if not p.estimated)
    from modeldoctor.checkup.experts import expert_grid

    rows, columns, grid = expert_grid(report, 1)
    assert rows == ["int4", "drop-expert"] and columns[0] == anatomy.blocks[1].moe.router
    assert np.isfinite(grid[0]).all() and np.isnan(grid[1, 0])  # the router is no expert to drop


def test_cumulative_scan_on_moe_counts_routes_of_every_modified_block(sessions, small_data_spec):
    """A cumulative step is not started from the previous step's states on a MoE model: that
    would skip the routers of its earlier targets, whose routes it changed."""
    session = sessions["olmoe"]
    data = session.data(small_data_spec)
    plan = CheckupPlan(modifications=["router-noise-0.5"], modes=("isolated", "cumulative"), knowledge=False)
    report = checkup(session, plan, data)
    isolated0 = next(p for p in report.probes if p.spec.mode == "isolated" and p.spec.targets == ("0",))
    step2 = next(p for p in report.probes if p.spec.mode == "cumulative" and p.spec.step == 2)
    assert step2.routing["flip_rate"][0] == isolated0.routing["flip_rate"][0] > 0


def test_cli_experts_scope(moe_dirs, tmp_path, capsys):
    from modeldoctor.cli import main

    code = main(["checkup", str(moe_dirs["qwen2_moe"]), "--modify", "int4,topk-minus1", "--scope", "experts",
                 "--tokens", "128", "--seq-len", "64", "--calibration-tokens", "64", "--selection-tokens", "64",
                 "--no-knowledge", "--out", str(tmp_path / "res"), "--quiet", "--exhaustive"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "flips" in captured.out and "Expert usage on the evaluation text" in captured.out
    assert "int4 @ 0.mlp.experts.0" in captured.out and "topk-minus1 @ 0" in captured.out
    data = json.loads((tmp_path / "res" / "checkup.json").read_text())
    assert data["reference"]["expert_usage"]["0"] and all(p["routing"]["flip_rate"] for p in data["probes"])
    assert main(["checkup", str(moe_dirs["qwen2_moe"]), "--modify", "router-noise-0"]) == 2
    assert "above zero" in capsys.readouterr().err


def test_mixed_precision_keeps_whole_experts_and_the_export_keeps_them(moe_dirs, small_data_spec):
    """Mixed precision's candidates are the block linears with each expert whole: a kept expert
    keeps all its linears; the keep list is what the export's formats keep in fp32, and an expert
    named in a keep list (CLI --keep) stands for its linears."""
    from modeldoctor.export.pipeline import formats_with
    from modeldoctor.treatment.base import TreatmentPlan
    from modeldoctor.treatment.mixed import keep_units
    from modeldoctor.treatment.run import treat

    session = Session.open(moe_dirs["mixtral"])
    anatomy = session.anatomy
    units = keep_units(anatomy)
    experts = [t for t in anatomy.expert_targets() if anatomy.expert_linears(t)]
    assert set(experts) <= set(units) and not any(n in units for t in experts for n in anatomy.expert_linears(t))
    assert all(f"{b.index}.{b.moe.router}" in units for b in anatomy.moe_blocks())  # routers are linears
    data = session.data(small_data_spec)
    digest = session.weights_digest()
    outcome = treat(session, TreatmentPlan(["mixed-precision"], target="int2", budget=0.3), data).outcomes[0]
    assert session.weights_digest() == digest  # keeping in fp32 changes no weight
    kept = set(outcome.details["kept"])
    kept_experts = [t for t in experts if kept & set(anatomy.expert_linears(t))]
    assert kept_experts, "the budget keeps at least one expert"
    assert all(set(anatomy.expert_linears(t)) <= kept for t in kept_experts)  # whole, never in part
    assert outcome.applied and outcome.after["kl_mean"] < outcome.before["kl_mean"]
    formats = formats_with(session, "int4", sorted(kept))
    assert {n for n, f in formats.items() if f == "fp32"} >= kept
    expert = experts[0]
    by_name = formats_with(session, "int4", [expert])
    assert [n for n, f in by_name.items() if f == "fp32"] == anatomy.expert_linears(expert)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_int8_dynamic_on_moe_blocks(sessions, small_data_spec, family):
    """An expert gets only its routed rows, which do not line up with the batch's tokens: int8
    dynamic takes their range at once instead of failing the checkup; one sequence alone is then
    exactly one batch-1 call."""
    session = sessions[family]
    data = session.data(small_data_spec)
    report = checkup(session, CheckupPlan(modifications=["int8-dynamic"], knowledge=False, exhaustive=True), data)
    assert report.status == "completed" and all(p.metrics["kl_mean"] > 0 for p in report.probes)


def test_unused_experts_are_named_in_the_diagnosis():
    from modeldoctor.checkup.diagnosis import diagnose
    from modeldoctor.checkup.experts import unused_experts
    from modeldoctor.report.results import CheckupReport

    report = CheckupReport(model={}, plan={"threshold": 0.01}, data={}, reference={
        "expert_usage": {"0": [1.0, 1.0, 0.0, 0.0], "1": [0.5, 0.5, 0.5, 0.5]},
        "expert_targets": ["0.mlp.gate", "0.mlp.experts.0"]})
    assert unused_experts(report) == [(0, 2), (0, 3)]
    finding = next(f for f in diagnose(report) if "never used" in f.title)
    assert finding.title == "2 experts never used" and "block 0: experts 2–3" in finding.text
    report.reference["expert_usage"]["0"] = [1.0, 0.5, 0.25, 0.25]
    assert not any("never used" in f.title for f in diagnose(report))


def test_a_removed_moe_block_routes_no_token(sessions, small_data_spec):
    session = sessions["mixtral"]
    data = session.data(small_data_spec)
    report = checkup(session, CheckupPlan(modifications=["remove"], knowledge=False, targets=["1"]), data)
    routing = report.probes[0].routing
    assert routing["flip_rate"][0] == 0.0 and routing["flip_rate"][1] == 1.0
    assert routing["load_modified"][1] == [0.0] * 4 and routing["load_modified"][0] == routing["load_original"][0]
