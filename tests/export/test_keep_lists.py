"""The exported graph has exactly the precision per linear that the keep list asks for, in every family."""

import onnx
import pytest
from onnx_graph import float_linears

from modeldoctor.data import DataSpec
from modeldoctor.events import Failed
from modeldoctor.export.pipeline import export_model
from modeldoctor.session import Session

SPEC = DataSpec(tokens=128, seq_len=64, calibration_tokens=64, knowledge=False)
QUANTIZED_OPS = {"int8": {"MatMulInteger", "DynamicQuantizeMatMul"}, "int4": {"MatMulNBits"}}


def quantized_count(path, precision) -> int:
    return sum(n.op_type in QUANTIZED_OPS[precision] for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "phi3"])
def test_kept_linears_stay_fp32_and_all_others_are_quantized(model_dirs, tmp_path, family, precision):
    session = Session.open(model_dirs[family])
    # Some block linears, and the head kept in the int8 export but quantized in the int4 one.
    keep = session.anatomy.linear_names()[::3] + (["head"] if precision == "int8" else [])
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", precision, exclude=keep,
                               budget_kl=100.0, prompts=["Hi"]))
    assert events[-1].reason == "completed", [getattr(e, "message", e) for e in events]
    path = tmp_path / "out" / "model.onnx"
    assert float_linears(path, session) == set(keep)
    assert quantized_count(path, precision) == len(session.anatomy.linear_targets()) - len(keep)


def test_a_quantizer_that_ignores_the_keep_list_is_caught(llama_session, tmp_path, monkeypatch):
    import modeldoctor.export.quantize as quantize

    original = quantize.quantize_model
    monkeypatch.setattr(quantize, "quantize_model",
                        lambda source, target, precision, exclude_nodes, *a, **k: original(source, target, precision,
                                                                                         [], *a, **k))
    keep = ["0.mlp.down_proj", "head"]
    events = list(export_model(llama_session, llama_session.data(SPEC), tmp_path / "out", "int8", exclude=keep,
                               budget_kl=100.0, prompts=["Hi"]))
    assert events[-1].reason == "failed"
    failure = next(e for e in events if isinstance(e, Failed))
    assert "keep list" in failure.message and "0.mlp.down_proj" in failure.message
    assert list(tmp_path.iterdir()) == []


def test_unknown_keep_name_is_refused_before_exporting(llama_session, tmp_path):
    events = list(export_model(llama_session, llama_session.data(SPEC), tmp_path / "out", "int8",
                               exclude=["9.mlp.nothing"]))
    assert events[-1].reason == "failed" and "No linear named 9.mlp.nothing" in events[-2].message
    assert not any(getattr(e, "name", None) == "export" for e in events)
