"""The LM head is a linear like the others: probed, kept, exported, and predicted as exported."""

import numpy as np
import pytest
import torch

from modeldoctor.checkup.plan import CheckupPlan, build_probes, scope_targets
from modeldoctor.checkup.run import checkup
from modeldoctor.data import DataSpec
from modeldoctor.export.pipeline import export_model
from modeldoctor.export.runtime import OnnxCausalLM
from modeldoctor.export.validate import sequences
from modeldoctor.model.anatomy import HEAD
from modeldoctor.modifications.base import create
from modeldoctor.session import Session

SPEC = DataSpec(tokens=128, seq_len=64, calibration_tokens=64, knowledge=False)
TIED = {"llama": False, "gpt2": True}


def logits(session, ids):
    with torch.inference_mode():
        return session.model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(TIED))
def test_head_is_a_linear_target(model_dirs, family):
    anatomy = Session.open(model_dirs[family]).anatomy
    assert anatomy.head_tied is TIED[family]
    assert anatomy.linear_targets() == anatomy.linear_names() + [HEAD]
    assert anatomy.linear(HEAD) is anatomy.head and anatomy.block_of(HEAD) == anatomy.num_blocks
    assert anatomy.qualified_name(HEAD) == "lm_head"
    assert scope_targets(anatomy, "linears")[-1] == HEAD
    assert scope_targets(anatomy, "linears", [HEAD]) == [HEAD]
    probes, _ = build_probes(CheckupPlan(modifications=["int4-g32-asym", "prune-wanda-50", "prune-mag-50"],
                                         scope="linears"), anatomy)
    with_head = {p.modification for p in probes if p.targets == (HEAD,)}
    # Wanda needs calibration norms, which the session collects for block linears only.
    assert with_head == {"int4-g32-asym", "prune-mag-50"}


@pytest.mark.parametrize("family", sorted(TIED))
@pytest.mark.parametrize("modification", ["int4-g32-asym", "int8-dynamic", "prune-mag-50"])
def test_a_head_probe_changes_only_the_head_and_restores_bit_exact(model_dirs, family, modification):
    session = Session.open(model_dirs[family])
    anatomy = session.anatomy
    ids = torch.randint(3, 300, (1, 16))
    before, digest = logits(session, ids), session.weights_digest()
    embedding = anatomy.embedding.weight.detach().clone()
    with create(modification).applied(session.mod_context(), [HEAD]):
        changed = logits(session, ids)
        assert not torch.equal(changed, before)
        # The export quantizes the head's MatMul, never the embedding lookup, tied or not.
        assert torch.equal(anatomy.embedding.weight, embedding)
        if TIED[family]:
            assert not torch.equal(anatomy.head.weight, embedding)  # the head got its own modified copy
    assert session.weights_digest() == digest
    assert anatomy.head_tied is TIED[family]
    torch.testing.assert_close(logits(session, ids), before, rtol=0, atol=0)


def test_a_checkup_probes_the_head_with_and_without_the_prefix_cache(llama_session):
    data = llama_session.data(SPEC)
    plans = [CheckupPlan(modifications=["int4-g32-asym"], scope="linears", targets=[HEAD], knowledge=False,
                         prefix_cache=cached) for cached in (True, False)]
    cached, full = (checkup(llama_session, plan, data) for plan in plans)
    assert [p.spec.targets for p in cached.probes] == [(HEAD,)] and cached.probes[0].spec.block == 3
    assert cached.probes[0].score > 0
    assert cached.probes[0].score == pytest.approx(full.probes[0].score, rel=1e-5)


def test_head_is_listed_and_named_in_the_findings(llama_dir, llama_session, capsys):
    from modeldoctor.checkup.diagnosis import diagnose
    from modeldoctor.cli import main
    from modeldoctor.treatment.recommend import recommend

    assert main(["info", str(llama_dir)]) == 0
    assert "LM head" in capsys.readouterr().out
    report = checkup(llama_session, CheckupPlan(modifications=["int3"], scope="linears", targets=[HEAD],
                                                knowledge=False, threshold=1e-6), llama_session.data(SPEC))
    assert report.probes[0].bleeding
    assert any(HEAD in f.text or HEAD in f.title for f in diagnose(report))
    assert any(HEAD in r.reason for r in recommend(report))


@pytest.mark.parametrize("family", sorted(TIED))
def test_the_simulation_of_every_linear_is_what_the_int4_export_computes(model_dirs, tmp_path, family):
    """Prediction and export agree: int4-g32-asym applied in torch to every linear target (the
    head too, tied or not) but the kept ones gives the exported model's logits."""
    session = Session.open(model_dirs[family])
    data = session.data(SPEC)
    keep = [session.anatomy.linear_names()[1]]
    events = list(export_model(session, data, tmp_path / "out", "int4", exclude=keep, budget_kl=100.0,
                               prompts=["Hi"]))
    assert events[-1].reason == "completed"
    exported = OnnxCausalLM(tmp_path / "out" / "model.onnx")
    mod = create("int4-g32-asym")
    worst_gap, shift = 0.0, 0.0
    for seq in sequences(data)[:2]:
        ids = torch.from_numpy(seq)
        reference = logits(session, ids)
        with mod.applied(session.mod_context(keep=frozenset(keep)), session.anatomy.linear_targets()):
            simulated = logits(session, ids)
        onnx_logits = torch.from_numpy(exported.logits(seq))
        worst_gap = max(worst_gap, float((simulated - onnx_logits).abs().max()))
        shift = max(shift, float((reference - onnx_logits).abs().max()))
    assert shift > 0.05  # int4 moves the logits ...
    assert worst_gap < 1e-3 * shift + 1e-4  # ... exactly as the simulation says


def test_the_checkup_predicts_the_heads_share_of_the_export(llama_session, tmp_path):
    data = llama_session.data(SPEC)
    report = checkup(llama_session, CheckupPlan(modifications=["int8-dynamic"], scope="linears", knowledge=False),
                     data)
    head = next(p for p in report.probes if p.spec.targets == (HEAD,))
    assert head.score > 0
    kept = [HEAD]
    events = list(export_model(llama_session, data, tmp_path / "kept", "int8", report, exclude=kept,
                               budget_kl=100.0, prompts=["Hi"]))
    quantized = list(export_model(llama_session, data, tmp_path / "all", "int8", report, exclude=[],
                                  budget_kl=100.0, prompts=["Hi"]))
    kept_result, all_result = events[-1].report, quantized[-1].report
    assert all_result.predicted_kl - kept_result.predicted_kl == pytest.approx(head.score)
    # Quantizing the head costs the export about what its probe said.
    measured = all_result.validation["kl_mean"] - kept_result.validation["kl_mean"]
    assert measured > 0
    assert np.isclose(measured, head.score, rtol=0.5)


@pytest.mark.parametrize("family", sorted(TIED))
def test_a_tied_head_stays_fp32_unless_a_keep_list_says_otherwise(model_dirs, tmp_path, family):
    """Keeping a tied head costs nothing (the embedding keeps its fp32 weight anyway), so the
    automatic choice keeps it; an untied head is quantized like the block linears."""
    from tests.export.test_keep_lists import float_linears

    session = Session.open(model_dirs[family])
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", "int8", budget_kl=100.0,
                               prompts=["Hi"]))
    result = events[-1].report
    assert events[-1].reason == "completed"
    assert result.excluded_linears == ([HEAD] if TIED[family] else [])
    assert float_linears(tmp_path / "out" / "model.onnx", session) == set(result.excluded_linears)
