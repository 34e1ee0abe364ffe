"""The exported graph has exactly the precision per linear that the keep list asks for, in every family."""

import onnx
import pytest
from onnx_graph import float_linears

from modeldoctor.data import DataSpec
from modeldoctor.events import Failed
from modeldoctor.export.pipeline import export_model
from modeldoctor.session import Session

SPEC = DataSpec(tokens=128, seq_len=64, calibration_tokens=64, knowledge=False)
QUANTIZED_OPS = {"int8-dynamic": {"MatMulInteger", "DynamicQuantizeMatMul"}, "int8": {"MatMulNBits"},
                 "int4": {"MatMulNBits"}}


def quantized_bits(path) -> list[tuple[int, int]]:
    """The (width, block size) of every MatMulNBits in the file."""
    return sorted(tuple(next(a.i for a in n.attribute if a.name == key) for key in ("bits", "block_size"))
                  for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits")


def quantized_count(path, precision) -> int:
    return sum(n.op_type in QUANTIZED_OPS[precision] for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "phi3"])
def test_kept_linears_stay_fp32_and_all_others_are_quantized(model_dirs, tmp_path, family, precision):
    session = Session.open(model_dirs[family])
    # Some block linears, and the head kept in one export and quantized in the others.
    keep = session.anatomy.linear_names()[::3] + (["head"] if precision == "int8-dynamic" else [])
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", precision, exclude=keep,
                               budget_kl=100.0, prompts=["Hi"]))
    assert events[-1].reason == "completed", [getattr(e, "message", e) for e in events]
    path = tmp_path / "out" / "model.onnx"
    assert float_linears(path, session) == set(keep)
    assert quantized_count(path, precision) == len(session.anatomy.linear_targets()) - len(keep)
    if precision == "int4":  # the head at 8 bits, every other quantized linear at 4
        assert quantized_bits(path) == [(4, 32)] * (len(session.anatomy.linear_targets()) - len(keep) - 1) + [(8, 32)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_every_linear_is_written_in_its_own_format(model_dirs, tmp_path, family):
    """A mix of fp32 and every block format in one file, each exactly as asked (the head at 4 bits
    too, which a tied head shares with the embedding lookup as one 4-bit table)."""
    from modeldoctor.export import BLOCK_FORMATS

    session = Session.open(model_dirs[family])
    names = session.anatomy.linear_targets()
    mix = ("fp32", *BLOCK_FORMATS)
    formats = {name: mix[i % len(mix)] for i, name in enumerate(names)}
    formats["head"] = "int4"
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", "int4", formats=formats,
                               budget_kl=100.0, prompts=["Hi"]))
    assert events[-1].reason == "completed", [getattr(e, "message", e) for e in events]
    result = events[-1].report
    path = tmp_path / "out" / "model.onnx"
    assert result.formats == formats
    assert float_linears(path, session) == {n for n, f in formats.items() if f == "fp32"}
    wanted = sorted(BLOCK_FORMATS[f] for f in formats.values() if f != "fp32")
    assert quantized_bits(path) == wanted
    lookups = [n for n in onnx.load(str(path)).graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookups) == session.anatomy.head_tied


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8"])
def test_a_quantizer_that_ignores_the_keep_list_is_caught(llama_session, tmp_path, monkeypatch, precision):
    import modeldoctor.export.quantize as quantize

    if precision == "int8-dynamic":
        original = quantize.quantize_dynamic_int8
        monkeypatch.setattr(quantize, "quantize_dynamic_int8",
                            lambda source, target, exclude_nodes, *a: original(source, target, [], *a))
    else:
        original = quantize.write_block_formats
        monkeypatch.setattr(quantize, "write_block_formats", lambda model, anatomy, mapping, formats: original(
            model, anatomy, mapping, {n: "int8" for n in formats}))
    keep = ["0.mlp.down_proj", "head"]
    events = list(export_model(llama_session, llama_session.data(SPEC), tmp_path / "out", precision, exclude=keep,
                               budget_kl=100.0, prompts=["Hi"]))
    assert events[-1].reason == "failed"
    failure = next(e for e in events if isinstance(e, Failed))
    assert "format chosen" in failure.message and "0.mlp.down_proj" in failure.message
    assert list(tmp_path.iterdir()) == []


def test_a_quantizer_that_writes_the_wrong_width_is_caught(llama_session, tmp_path, monkeypatch):
    import modeldoctor.export.quantize as quantize

    original = quantize.write_block_formats
    monkeypatch.setattr(quantize, "write_block_formats", lambda model, anatomy, mapping, formats: original(
        model, anatomy, mapping, {n: "int4" if f == "int8" else f for n, f in formats.items()}))
    events = list(export_model(llama_session, llama_session.data(SPEC), tmp_path / "out", "int8",
                               budget_kl=100.0, prompts=["Hi"]))
    failure = next(e for e in events if isinstance(e, Failed))
    assert "meant int8" in failure.message
    assert list(tmp_path.iterdir()) == []


def test_unknown_keep_name_is_refused_before_exporting(llama_session, tmp_path):
    events = list(export_model(llama_session, llama_session.data(SPEC), tmp_path / "out", "int8",
                               exclude=["9.mlp.nothing"]))
    assert events[-1].reason == "failed" and "No linear named 9.mlp.nothing" in events[-2].message
    assert not any(getattr(e, "name", None) == "export" for e in events)


@pytest.mark.parametrize("fmt", ["int8-b128", "int4-b128", "int8"])
def test_the_predicted_size_counts_the_padding_of_part_filled_blocks(model_dirs, tmp_path, fmt):
    """A 32-wide model's rows fill a quarter of a block of 128; the file stores the whole block,
    and the prediction (weights as written, plus the fp32 export's graph) says so."""
    session = Session.open(model_dirs["gpt2"])  # tied: the shared table is padded too
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", "int8", budget_kl=100.0,
                               prompts=["Hi"], formats={n: fmt for n in session.anatomy.linear_targets()}))
    result = events[-1].report
    assert events[-1].reason == "completed"
    assert result.predicted_bytes == pytest.approx(result.validation["size_bytes"], rel=0.03)
