"""Exporting a mixture of experts (Qwen3-MoE: the MoE family optimum-onnx exports): an expert
named in the keep list stays fp32 whole, the router with it, everything else is quantized, and
the torch simulation of the formats predicts the file's KL."""

import pytest
from onnx_graph import float_linears

from modeldoctor.data import DataSpec
from modeldoctor.export.pipeline import export_model
from modeldoctor.session import Session

SPEC = DataSpec(tokens=128, seq_len=64, calibration_tokens=64, knowledge=False)


@pytest.mark.parametrize("precision", ["int4", "int8-dynamic"])
def test_kept_expert_and_router_stay_fp32(moe_dirs, tmp_path, precision):
    session = Session.open(moe_dirs["qwen3_moe"])
    anatomy = session.anatomy
    part = anatomy.blocks[1]
    expert, router = f"1.{list(part.moe.experts)[2]}", f"1.{part.moe.router}"
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", precision, exclude=[expert, router],
                               budget_kl=100.0, prompts=["Hi"]))
    assert events[-1].reason == "completed", [getattr(e, "message", e) for e in events]
    result = events[-1].report
    assert float_linears(tmp_path / "out" / "model.onnx", session) == {*anatomy.expert_linears(expert), router}
    # The simulation quantizes routed experts as the file runs them (int8 dynamic: one activation
    # range over an expert's routed rows): it predicts the measured KL.
    measured = result.validation["kl_mean"]
    assert measured > 0 and result.simulated_kl == pytest.approx(measured, rel=0.15)
