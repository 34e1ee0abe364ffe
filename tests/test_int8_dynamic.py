"""int8 dynamic quantization: the checkup's simulation against onnxruntime's call shapes.

onnxruntime's DynamicQuantizeLinear takes one activation range per call over the whole
input tensor. A prefill call sees one sequence's real tokens; a decode call sees one token.
The checkup runs padded batches, so it must not let padding into a sequence's range.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from modeldoctor.checkup.diagnosis import diagnose, prefill_vs_decode
from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.checkup.run import checkup
from modeldoctor.cli import main
from modeldoctor.data import DataSpec, EvalData
from modeldoctor.export.quantize import quantize_dynamic_int8
from modeldoctor.modifications.base import create, token_mask
from modeldoctor.modifications.quantize import ort_dynamic_quantize_activation, ort_int8_weight

IN_FEATURES, OUT_FEATURES = 24, 16


def _onnx_int8_linear(weight: torch.Tensor, folder):
    """One linear (MatMul with a constant weight) quantized by the export's own onnxruntime call."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", IN_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", OUT_FEATURES])],
        [numpy_helper.from_array(weight.t().contiguous().numpy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, folder / "fp32.onnx")
    quantize_dynamic_int8(folder / "fp32.onnx", folder / "int8.onnx", [], external_data=False)
    ops = {node.op_type for node in onnx.load(str(folder / "int8.onnx")).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "DynamicQuantizeLinear"}, ops  # really quantized
    session = ort.InferenceSession(str(folder / "int8.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.fixture()
def linear_int8(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES).clamp(-2, 2)
    weight[0] = 0.0
    weight[0, 0] = 4.5
    return weight, _onnx_int8_linear(weight, tmp_path)


def test_large_weights_and_activations_do_not_saturate(tmp_path):
    """Every weight near the tensor's maximum and activations of one sign: at full int8 range,
    pairs of 255·127 products overflow the int16 sums of the u8×s8 kernel on CPUs without VNNI
    (the 'collapse'). The export's 7-bit weights keep each pair below the limit, so the written
    file computes what the checkup simulates, on any x86 CPU."""
    torch.manual_seed(5)
    weight = (1.0 + 0.05 * torch.rand(OUT_FEATURES, IN_FEATURES)) * torch.where(torch.rand(OUT_FEATURES, 1) > 0.5,
                                                                                 1.0, -1.0)
    run_onnx = _onnx_int8_linear(weight, tmp_path)
    # The written levels themselves, whatever this CPU's kernel (with VNNI nothing saturates).
    written = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer
               if i.data_type == TensorProto.INT8 and i.dims]
    assert written and max(int(np.abs(w.astype(np.int32)).max()) for w in written) <= 64
    x = torch.rand(1, 9, IN_FEATURES) * 3.0 + 1.0  # uint8 values near 255 with a zero point near 0
    simulated = ort_dynamic_quantize_activation(x) @ ort_int8_weight(weight).t()
    torch.testing.assert_close(simulated, run_onnx(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(simulated, x @ weight.t(), rtol=0.05, atol=0.0)


def _activations(tokens: int, seed: int) -> torch.Tensor:
    """Tokens with very different ranges, as real activations have (an outlier token or two)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, IN_FEATURES, generator=g) * torch.rand(1, tokens, 1, generator=g) * 3
    x[0, tokens // 2, 3] = 25.0
    return x + 0.3


def test_prefill_of_one_sequence_matches_onnxruntime(linear_int8):
    weight, run_onnx = linear_int8
    x = _activations(19, seed=1)
    simulated = ort_dynamic_quantize_activation(x) @ ort_int8_weight(weight).t()
    torch.testing.assert_close(simulated, run_onnx(x), rtol=1e-5, atol=1e-4)


def test_padded_row_quantizes_as_its_sequence_alone(linear_int8):
    """In a right-padded batch, a sequence's range must come from its real tokens only."""
    weight, run_onnx = linear_int8
    long, short = _activations(19, seed=2), _activations(7, seed=3)
    batch = torch.zeros(2, 19, IN_FEATURES)
    batch[0] = long[0]
    batch[1, :7] = short[0]
    batch[1, 7:] = 40.0  # padded positions: whatever the model computes there
    valid = torch.zeros(2, 19, dtype=torch.long)
    valid[0], valid[1, :7] = 1, 1
    simulated = ort_dynamic_quantize_activation(batch, valid) @ ort_int8_weight(weight).t()
    torch.testing.assert_close(simulated[1:, :7], run_onnx(short), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(simulated[:1], run_onnx(long), rtol=1e-5, atol=1e-4)


def test_decode_matches_onnxruntime_one_token_calls(linear_int8):
    weight, run_onnx = linear_int8
    x = _activations(11, seed=4)
    one_call_per_token = torch.cat([run_onnx(x[:, t:t + 1]) for t in range(x.shape[1])], dim=1)
    simulated = ort_dynamic_quantize_activation(x, per_token=True) @ ort_int8_weight(weight).t()
    torch.testing.assert_close(simulated, one_call_per_token, rtol=1e-5, atol=1e-4)
    prefill = ort_dynamic_quantize_activation(x) @ ort_int8_weight(weight).t()
    assert (prefill - one_call_per_token).abs().max() > 1e-2  # the two call shapes really differ


def test_decode_modification_equals_kv_cache_decoding(llama_session):
    """int8-dynamic-decode in one full forward = int8-dynamic fed one token per call with a
    KV cache (each token's keys and values come from the call that processed it). In float64,
    so that float noise between the two ways of computing attention never moves a value across
    a uint8 rounding step (one such step would spread to every later token through the cache)."""
    model = llama_session.model.double()
    ids = torch.arange(5, 25)[None]
    ctx = llama_session.mod_context()
    targets = [str(b.index) for b in llama_session.anatomy.blocks]
    with create("int8-dynamic").applied(ctx, targets), torch.inference_mode():
        out = model(input_ids=ids[:, :1], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(1, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
        stepwise = torch.cat(steps, dim=1)
        prefill = model(input_ids=ids, use_cache=False).logits
    with create("int8-dynamic-decode").applied(ctx, targets), torch.inference_mode():
        decode = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(decode, stepwise, rtol=1e-9, atol=1e-9)
    assert (prefill - stepwise).abs().max() > 1e-2


def test_token_mask_is_restored_after_the_batch(llama_session):
    ctx = llama_session.mod_context()
    mask = torch.ones(1, 4, dtype=torch.long)
    with token_mask(ctx, mask):
        assert ctx.token_mask is mask
    assert ctx.token_mask is None


def _eval_data(sequences: list[list[int]], batch_size: int, pad_id: int, seed: int) -> EvalData:
    from modeldoctor.data.sources import _batches

    spec = DataSpec(tokens=sum(map(len, sequences)), seq_len=64, batch_size=batch_size, knowledge=False, seed=seed)
    return EvalData(spec, _batches(sequences, batch_size, pad_id), [], [], [])


@pytest.mark.parametrize("name", ["int8-dynamic", "int8-dynamic-decode"])
def test_padded_batches_measure_like_each_sequence_alone(llama_session, small_data_spec, name):
    """The checkup runs padded batches; export validation (and deployment) runs each sequence
    alone. Both must give the same figures."""
    session = llama_session
    session.model.double()  # no float noise between batched and single runs to flip a rounding step
    pad = session.tokenizer.pad_token_id
    with torch.no_grad():  # a pad token whose embedding is an outlier, as untrained rows often are
        session.model.get_input_embeddings().weight[pad] = torch.linspace(-1, 1, session.anatomy.hidden_size) ** 9 * 40
    rows = [row[mask.bool()].tolist() for b in session.data(small_data_spec).eval_batches
            for row, mask in zip(b.input_ids, b.attention_mask)]
    sequences = [rows[0], rows[1][:23], rows[2][:41]]
    batched = _eval_data(sequences, 3, pad, seed=101)
    assert int((batched.eval_batches[0].attention_mask == 0).sum()) > 40  # really padded
    alone = _eval_data(sequences, 1, pad, seed=102)
    targets = ["0.self_attn.q_proj", "0.mlp.down_proj", "1.mlp.gate_proj", "2.self_attn.o_proj"]
    plan = CheckupPlan(modifications=[name], scope="linears", targets=targets, knowledge=False)
    together = checkup(session, plan, batched)
    separate = checkup(session, plan, alone)
    for a, b in zip(together.probes, separate.probes):
        assert a.spec.targets == b.spec.targets
        assert a.metrics["kl_mean"] > 1e-6  # the quantization is felt
        for key in ("kl_mean", "kl_max", "same_top", "ppl"):
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-6, abs=1e-9), (a.spec.label, key)


@pytest.fixture()
def both_call_shapes(llama_session, small_data_spec):
    plan = CheckupPlan(modifications=["int8-dynamic", "int8-dynamic-decode"], scope="linears",
                       targets=["0.self_attn.v_proj", "0.mlp.down_proj", "1.mlp.up_proj", "2.mlp.down_proj"],
                       knowledge=False)
    return checkup(llama_session, plan, llama_session.data(small_data_spec))


def test_diagnosis_names_the_linears_where_prefill_and_decode_differ_most(both_call_shapes):
    report = both_call_shapes
    scores = {(r.spec.modification, r.spec.targets[0]): r.score for r in report.probes}
    linears = {t for _, t in scores}
    ratio = {t: scores["int8-dynamic", t] / scores["int8-dynamic-decode", t] for t in linears}
    most = max(linears, key=lambda t: abs(np.log(ratio[t])))
    rows = prefill_vs_decode(report)
    assert [row["linear"] for row in rows][0] == most
    assert rows[0]["ratio"] == pytest.approx(ratio[most])
    finding = next(f for f in diagnose(report) if "prefill vs decode" in f.title)
    assert most in finding.text


def test_diagnosis_has_no_prefill_vs_decode_line_without_both(llama_session, small_data_spec):
    plan = CheckupPlan(modifications=["int8-dynamic"], scope="linears", targets=["0.mlp.down_proj"],
                       knowledge=False)
    report = checkup(llama_session, plan, llama_session.data(small_data_spec))
    assert not prefill_vs_decode(report)
    assert not any("prefill vs decode" in f.title for f in diagnose(report))


def test_cli_prints_the_prefill_vs_decode_table(llama_dir, tmp_path, capsys):
    code = main(["checkup", str(llama_dir), "--modify", "int8-dynamic,int8-dynamic-decode", "--scope", "linears",
                 "--targets", "0.mlp.down_proj,1.self_attn.k_proj", "--tokens", "128", "--seq-len", "64",
                 "--no-knowledge", "--out", str(tmp_path / "res"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    table = captured.out.split("Prefill vs decode")[1].split("\n\n")[0]
    lines = [line for line in table.splitlines() if "_proj" in line]
    assert {line.split()[0] for line in lines} == {"0.mlp.down_proj", "1.self_attn.k_proj"}


def test_bleeding_under_decode_recommends_a_valid_int8_dynamic_treatment():
    from modeldoctor.checkup.verdict import judge
    from modeldoctor.report import CheckupReport
    from modeldoctor.report.results import ProbeRecord, ProbeSpec
    from modeldoctor.treatment.base import TreatmentPlan
    from modeldoctor.treatment.recommend import recommend

    spec = ProbeSpec(0, "int8-dynamic-decode", "quantize", "isolated", ("0.mlp.down_proj",), 0)
    record = ProbeRecord(spec, {"kl_mean": 0.5}, *judge({"kl_mean": 0.5}, "quantize", 0.01)[:3])
    report = CheckupReport(model={}, plan={}, data={}, reference={}, probes=[record])
    advice = recommend(report)[0]
    assert advice.target == "int8-dynamic-decode" and "smoothquant" in advice.treatments
    TreatmentPlan(list(advice.treatments), target=advice.target).validate()  # no PlanError
