"""An export is predicted and tuned only by what simulates exactly the format it writes."""

import json
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.checkup.run import checkup
from modeldoctor.data import DataSpec
from modeldoctor.events import LogMessage
from modeldoctor.export.pipeline import PREDICTORS, choose_formats, export_model, preset_formats
from modeldoctor.export import BLOCK_FORMATS
from modeldoctor.modifications.base import create
from modeldoctor.modifications.quantize import quantize_rtn

SPEC = DataSpec(tokens=128, seq_len=64, calibration_tokens=64, knowledge=False)


def one_linear(weight: torch.Tensor):
    out_features, in_features = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "one_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_features])],
        [numpy_helper.from_array(weight.t().contiguous().numpy(), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_quantized(weight: torch.Tensor, bits: int, block: int):
    """One MatMul quantized by onnxruntime's own MatMulNBits quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.disable(logging.INFO)
    try:
        quantizer = MatMulNBitsQuantizer(one_linear(weight), bits=bits, block_size=block, is_symmetric=False,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    return model


def matmulnbits_weight(weight: torch.Tensor, bits: int, block: int) -> np.ndarray:
    """The (out, in) weight that onnxruntime computes with for this linear quantized by its own
    MatMulNBits quantizer: the graph run on the identity (float activations)."""
    session = ort.InferenceSession(ort_quantized(weight, bits, block).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(weight.shape[1], dtype=np.float32)})[0].T


def packed_blocks(model) -> list[np.ndarray]:
    """The quantized weight, scales and zero points a MatMulNBits node reads, in input order."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    return [initializers[name].reshape(-1) for name in node.input[1:]]


def our_quantized(weight: torch.Tensor, fmt: str):
    """The same linear as our exporter writes it (block_quantize → MatMulNBits)."""
    from modeldoctor.export.quantize import _matmul_nbits

    model = one_linear(weight)
    node = model.graph.node.pop()
    weight_in_out = numpy_helper.to_array(model.graph.initializer.pop())
    model.graph.node.append(_matmul_nbits(node, weight_in_out, fmt, "w", model.graph))
    return model


@pytest.mark.parametrize("fmt", sorted(BLOCK_FORMATS))
def test_the_block_formats_are_what_their_predictions_simulate(fmt):
    assert PREDICTORS["int4"] == "int4-b32" and PREDICTORS["int8"] == "int8-b32"
    assert PREDICTORS["int8-b128"] == "int8-b128" and PREDICTORS["int8-dynamic"] == "int8-dynamic"
    bits, block = BLOCK_FORMATS[fmt]
    torch.manual_seed(0)
    ties = torch.zeros(6, 40)  # 40 inputs: a padded second block
    ties[0, :32] = torch.linspace(-0.75, 3.0, 32)  # scale 0.25, zero point 3: w / scale + 3 hits halves
    ties[0, 2:8] = torch.tensor([0.125, -0.125, 0.375, -0.375, 0.625, 1.125])
    ties[1] = torch.rand(40) + 0.5  # all positive
    ties[2] = -torch.rand(40) - 0.5  # all negative
    ties[3, 5] = 1.0  # a single nonzero value; ties[4] stays all zero
    ties[5] = torch.randn(40) * 1e-3
    # Inputs that leave the last block part-filled at every block size (40, 96, 200).
    for weight in (ties, torch.randn(24, 96) * 0.2, torch.randn(8, 64).pow(3), torch.randn(4, 200)):
        expected = matmulnbits_weight(weight, bits, block)
        for ours, theirs in zip(packed_blocks(our_quantized(weight, fmt)),
                                packed_blocks(ort_quantized(weight, bits, block))):
            np.testing.assert_array_equal(ours, theirs)  # our file packs exactly as onnxruntime's quantizer
        simulated = quantize_rtn(weight, bits, block, symmetric=False).numpy()
        np.testing.assert_array_equal(simulated, expected)
        # The probe adds the activations (next test and test_head_target).
        for name in (f"int{bits}-g{block}-asym", PREDICTORS[fmt]):
            assert torch.equal(create(name).new_weight(None, "x", weight), torch.from_numpy(expected))


@pytest.mark.parametrize("fmt", sorted(BLOCK_FORMATS))
def test_a_block_probe_computes_what_matmulnbits_computes(fmt):
    """Weights and activations: accuracy level 4 quantizes each row's inputs to int8 per block of
    the weights' block size, which the probe's hook simulates (float accumulation apart)."""
    bits, block = BLOCK_FORMATS[fmt]
    torch.manual_seed(1)
    weight, inputs = torch.randn(16, 200) * 0.1, torch.randn(5, 200) * 3
    model = our_quantized(weight, fmt)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 5
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runtime = session.run(None, {"x": inputs.numpy()})[0]
    linear = torch.nn.Linear(200, 16, bias=False)
    linear.weight.data.copy_(create(PREDICTORS[fmt]).new_weight(None, "x", weight))
    hook = create(PREDICTORS[fmt]).extra_hooks(None, "x", linear)
    with torch.no_grad():
        simulated = linear(inputs).numpy()
    hook[0].remove()
    np.testing.assert_allclose(simulated, runtime, rtol=0, atol=1e-5 * np.abs(runtime).max())
    with torch.no_grad():
        weights_only = linear(inputs).numpy()
    assert np.abs(weights_only - runtime).max() > 100 * 1e-5 * np.abs(runtime).max()  # the activations matter


@pytest.fixture(scope="module")
def int4_channel_checkup(model_dirs):
    """A linear-scope checkup of plain int4 (per channel, symmetric): not what the int4 export writes."""
    from modeldoctor.session import Session

    session = Session.open(model_dirs["llama"])
    data = session.data(SPEC)
    report = checkup(session, CheckupPlan(modifications=["int4"], scope="linears", knowledge=False,
                                          threshold=1e-4), data)
    assert any(p.bleeding for p in report.probes)
    return session, report


def test_other_formats_probes_do_not_predict_the_export(int4_channel_checkup, tmp_path):
    session, report = int4_channel_checkup
    assert choose_formats(session, report, "int4", 0.02)[0] == preset_formats(session.anatomy, "int4")
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", "int4", report, budget_kl=100.0,
                               prompts=["Hi"]))
    result = events[-1].report
    assert events[-1].reason == "completed"
    assert result.excluded_linears == [] and result.predicted_kl is None
    assert result.missing_checkup == "int4-b32" and result.predicted_by is None
    notes = [e.message for e in events if isinstance(e, LogMessage)]
    assert any("int4-b32" in n and "checkup" in n for n in notes)
    card = json.loads((tmp_path / "out" / "modeldoctor.json").read_text())
    assert card["missing_checkup"] == "int4-b32"


def test_the_exact_format_predicts_the_export(llama_session, tmp_path):
    data = llama_session.data(SPEC)
    report = checkup(llama_session, CheckupPlan(modifications=["int4-b32"], scope="linears", knowledge=False,
                                                threshold=1e-4), data)
    events = list(export_model(llama_session, data, tmp_path / "out", "int4", report, budget_kl=0.01,
                               prompts=["Hi"]))
    result = events[-1].report
    worst = max(report.probes, key=lambda p: p.score).spec.targets[0]
    assert result.formats[worst] != "int4"  # the tight budget raises the worst linear to 8 bits or fp32
    assert result.predicted_by == "int4-b32" and result.missing_checkup is None
    # The prediction is about the written file: with the three worst linears kept, onnxruntime's
    # measured KL of the quantized rest lands near the predicted one (isolated KLs add up
    # roughly, not exactly), and well below the export that keeps nothing.
    worst = [p.spec.targets[0] for p in sorted(report.probes, key=lambda p: p.score, reverse=True)[:3]]
    every = {name: "int4" for name in llama_session.anatomy.linear_targets()}
    repaired = list(export_model(llama_session, data, tmp_path / "repaired", "int4", report,
                                 formats={**every, **{n: "fp32" for n in worst}}, budget_kl=100.0,
                                 prompts=["Hi"]))[-1].report
    naive = list(export_model(llama_session, data, tmp_path / "naive", "int4", report, formats=every, budget_kl=100.0,
                              prompts=["Hi"]))[-1].report
    for export in (repaired, naive):
        assert 0.5 * export.validation["kl_mean"] <= export.predicted_kl <= 2.0 * export.validation["kl_mean"]
        # All the formats at once in torch compute what the runtime computes: the simulated KL
        # is the measured one up to float noise, interactions included.
        assert export.simulated_kl == pytest.approx(export.validation["kl_mean"], rel=0.03)
    assert repaired.validation["kl_mean"] < 0.8 * naive.validation["kl_mean"]


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_the_simulated_mix_is_what_the_runtime_measures(llama_session, tmp_path, precision):
    """int8 (the tied table at 8 bits) and int8-dynamic (padded batches kept out of each
    sequence's activation range) simulated whole before writing, against onnxruntime."""
    data = llama_session.data(SPEC)
    every = {name: precision for name in llama_session.anatomy.linear_names()}
    result = list(export_model(llama_session, data, tmp_path / "out", precision, formats=every, budget_kl=100.0,
                               prompts=["Hi"]))[-1].report
    assert result.validation["kl_mean"] > 1e-5  # really quantized
    assert result.simulated_kl == pytest.approx(result.validation["kl_mean"], rel=0.03)


def test_keep_list_and_temperature_apply_only_to_their_own_format(llama_session, tmp_path):
    state = llama_session.treatment
    state.keep, state.keep_for = ["0.mlp.down_proj", "head"], "int4"
    state.temperature, state.temperature_for = 1.25, "int4"
    events = list(export_model(llama_session, llama_session.data(SPEC), tmp_path / "a", "int4", budget_kl=100.0,
                               prompts=["Hi"]))
    assert events[-1].reason == "completed" and events[-1].report.excluded_linears == []
    config = json.loads((tmp_path / "a" / "generation_config.json").read_text())
    assert "modeldoctor_calibrated_temperature" not in config
    notes = " ".join(e.message for e in events if isinstance(e, LogMessage))
    assert "chosen for int4, not for int4-b32" in notes and "fitted for int4" in notes

    state.keep_for = state.temperature_for = "int4-b32"
    events = list(export_model(llama_session, llama_session.data(SPEC), tmp_path / "b", "int4", budget_kl=100.0,
                               prompts=["Hi"]))
    assert events[-1].reason == "completed" and events[-1].report.excluded_linears == ["0.mlp.down_proj", "head"]
    assert events[-1].report.formats["1.mlp.down_proj"] == "int4"
    config = json.loads((tmp_path / "b" / "generation_config.json").read_text())
    assert config["modeldoctor_calibrated_temperature"] == pytest.approx(1.25)
