import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from conftest import FAMILIES
from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.checkup.run import checkup
from modeldoctor.errors import PlanError
from modeldoctor.model.anatomy import weight_matrix
from modeldoctor.modifications.base import create, example_names
from modeldoctor.modifications.prune import n_of_m, prune_lowest
from modeldoctor.modifications.quantize import ort_dynamic_quantize_activation, quantize_rtn
from modeldoctor.session import Session

WEIGHT_AND_STRUCTURE = [n for n in example_names()  # modifications/routing.py's need experts: tests/test_moe.py
                        if not n.startswith("decode") and not n.endswith("sweep") and n != "none"
                        and type(create(n)).__module__ != "modeldoctor.modifications.routing"]


def test_none_changes_nothing(llama_session):
    ids = torch.arange(3, 40)[None]
    reference = llama_session.model(input_ids=ids).logits
    with create("none").applied(llama_session.mod_context(), ["0", "1"]):
        torch.testing.assert_close(llama_session.model(input_ids=ids).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", WEIGHT_AND_STRUCTURE)
def test_every_modification_changes_then_restores_bit_exact(llama_session, small_data_spec, name):
    session = llama_session
    data = session.data(small_data_spec)
    mod = create(name)
    ctx = session.mod_context(data, mod.needs_input_norms, need_gradients=mod.needs_gradients)
    before = session.weights_digest()
    ids = data.eval_batches[0].input_ids
    reference = session.model(input_ids=ids).logits
    with mod.applied(ctx, ["1"]):
        changed = session.model(input_ids=ids).logits
    assert not torch.equal(changed, reference), f"{name} changed nothing"
    assert session.weights_digest() == before
    torch.testing.assert_close(session.model(input_ids=ids).logits, reference, rtol=0, atol=0)


def test_restore_after_exception(llama_session):
    before = llama_session.weights_digest()
    with pytest.raises(RuntimeError):
        with create("int2").applied(llama_session.mod_context(), ["0", "2"]):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with create("remove").applied(llama_session.mod_context(), ["1"]):
            raise RuntimeError("boom")
    assert llama_session.weights_digest() == before


def test_large_originals_wait_in_a_file_and_come_back_bit_exact(llama_session, monkeypatch):
    """Past SAVED_IN_FILE_BYTES a saved original goes to a temporary file, not memory (on a 1 B
    model the head's copy was a probe's largest allocation); it comes back bit-exact, a chunk at
    a time, in memory instead when the file cannot be written, and a file that cannot be read
    back is a clear error after everything else is put back."""
    from modeldoctor.errors import ModelNotRestoredError
    from modeldoctor.modifications import base

    session = llama_session
    before = session.weights_digest()
    ids = torch.arange(3, 40)[None]
    reference = session.model(input_ids=ids).logits
    made = []  # (saved, the tensor it saved)
    original_init = base._SavedTensor.__init__

    def recording(self, tensor):
        original_init(self, tensor)
        made.append((self, tensor))

    monkeypatch.setattr(base._SavedTensor, "__init__", recording)
    monkeypatch.setattr(base, "SAVED_IN_FILE_BYTES", 0)
    monkeypatch.setattr(base, "_FILE_CHUNK_BYTES", 1000)  # several chunks a tensor, the last one shorter
    assert any(t.numel() * t.element_size() % 1000 for t in session.model.parameters())
    targets = ["0", "1", "head"]
    with create("int2").applied(session.mod_context(), targets):
        assert not torch.equal(session.model(input_ids=ids).logits, reference)
        assert made and all(saved.copy is None and saved.file is not None for saved, _ in made)
    assert all(saved.file is None for saved, _ in made)  # removed once read back
    assert session.weights_digest() == before
    torch.testing.assert_close(session.model(input_ids=ids).logits, reference, rtol=0, atol=0)

    made.clear()  # no file to be had (a full disk): the copies stay in memory
    with monkeypatch.context() as patched:
        patched.setattr(base.tempfile, "TemporaryFile", lambda **kwargs: (_ for _ in ()).throw(OSError("full")))
        with create("int2").applied(session.mod_context(), targets):
            pass
    assert made and all(saved.copy is not None for saved, _ in made)
    assert session.weights_digest() == before

    made.clear()  # a file cut short: the others are put back, and the user is told to reload
    originals = {name: p.detach().clone() for name, p in session.model.named_parameters()}
    with pytest.raises(ModelNotRestoredError, match="load it again"):
        with create("int2").applied(session.mod_context(), ["0", "1"]):
            made[0][0].file.truncate(10)
    params = dict(session.model.named_parameters())
    failed = next(name for name, p in params.items() if p.data_ptr() == made[0][1].data_ptr())
    assert not torch.equal(params[failed], originals[failed])  # still quantized
    assert all(torch.equal(p, originals[name]) for name, p in params.items() if name != failed)
    assert all(saved.file is None for saved, _ in made)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_two_bits_bleed_more_than_eight(model_dirs, small_data_spec, family):
    session = Session.open(model_dirs[family])
    plan = CheckupPlan(modifications=["int8", "int2"], targets=["1"], knowledge=False)
    report = checkup(session, plan, session.data(small_data_spec))
    kl = {p.spec.modification: p.metrics["kl_mean"] for p in report.probes}
    assert kl["int2"] > 20 * kl["int8"]
    assert report.probes[1].bleeding and not report.probes[0].bleeding


def test_rtn_rounds_to_the_nearest_of_at_most_two_to_the_bits_levels():
    """Round-to-nearest: at most 2^bits levels per row (or group), every weight within half a
    grid step of its value, and symmetric grids represent each row's largest |w| exactly.
    The step is the range a b-bit grid must span divided by its number of intervals."""
    weight = torch.randn(8, 64)
    for bits in (2, 3, 4):
        for group in (None, 32):
            for symmetric in (True, False):
                q = quantize_rtn(weight, bits, group, symmetric)
                size = group or 64
                w_rows, q_rows = weight.reshape(-1, size), q.reshape(-1, size)
                for w_row, q_row in zip(w_rows, q_rows):
                    assert len(torch.unique(q_row)) <= 2 ** bits
                    if symmetric:
                        step = float(w_row.abs().max()) / (2 ** (bits - 1) - 1)
                        peak = int(w_row.abs().argmax())
                        assert float(q_row[peak]) == pytest.approx(float(w_row[peak]), rel=1e-5)
                    else:  # the range widened to hold 0, 2^bits - 1 intervals
                        step = (max(float(w_row.max()), 0.0) - min(float(w_row.min()), 0.0)) / (2 ** bits - 1)
                    assert float((q_row - w_row).abs().max()) <= step / 2 * (1 + 1e-4) + 1e-7, (bits, group,
                                                                                               symmetric)


def test_magnitude_and_wanda_zero_exactly_the_lowest_scores():
    weight = torch.randn(16, 40)
    pruned = prune_lowest(weight, weight.abs(), 0.5, per_row=False)
    zeroed = pruned == 0
    assert int(zeroed.sum()) == 320
    # Every weight removed has a smaller magnitude than every weight kept, and kept ones are untouched.
    assert weight.abs()[zeroed].max() < weight.abs()[~zeroed].min()
    assert torch.equal(pruned[~zeroed], weight[~zeroed])
    score = weight.abs() * torch.rand(40)[None]
    pruned = prune_lowest(weight, score, 0.3, per_row=True)
    zeroed = pruned == 0
    assert (zeroed.sum(1) == 12).all()
    for row in range(16):
        assert score[row][zeroed[row]].max() < score[row][~zeroed[row]].min()
    assert torch.equal(pruned[~zeroed], weight[~zeroed])


def test_two_of_four_keeps_the_two_highest_scores_of_every_group():
    weight = torch.randn(4, 16)
    score = torch.rand(4, 16)
    pruned = n_of_m(weight, score)
    for row in range(4):
        for start in range(0, 16, 4):
            kept = sorted(range(start, start + 4), key=lambda c: float(score[row, c]))[2:]
            expected = [float(weight[row, c]) if c in kept else 0.0 for c in range(start, start + 4)]
            assert pruned[row, start:start + 4].tolist() == expected


def test_structured_pruning_zeroes_the_lowest_norm_heads_and_channels(llama_session):
    """Whole heads (column groups of the attention output) or whole MLP channels (columns of the
    down projection) go, the ones of lowest norm; every other column is left as it was."""
    anatomy = llama_session.anatomy
    part = anatomy.blocks[0]
    for name, rel, group in (("prune-heads-50", part.attention_out, anatomy.head_dim), ("prune-channels-25",
                                                                                        part.mlp_down, 1)):
        linear = part.linears[rel]
        before = weight_matrix(linear).detach().clone()
        units = before.shape[1] // group
        norms = [float(before[:, u * group:(u + 1) * group].norm()) for u in range(units)]
        expected = set(sorted(range(units), key=norms.__getitem__)[:round(units * int(name.split("-")[-1]) / 100)])
        with create(name).applied(llama_session.mod_context(), ["0"]):
            after = weight_matrix(linear).detach().clone()
        gone = {u for u in range(units) if not after[:, u * group:(u + 1) * group].any()}
        assert gone == expected, name
        kept = [c for u in range(units) if u not in gone for c in range(u * group, (u + 1) * group)]
        assert torch.equal(after[:, kept], before[:, kept]), name


def test_int8_dynamic_activation_matches_onnxruntime():
    """The checkup's mirror of DynamicQuantizeLinear must agree with onnxruntime bit for bit."""
    x = (torch.randn(1, 7, 33) * 3 + 0.5).float()
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"]),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])],
        "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7, 33])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, 33])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(ort_dynamic_quantize_activation(x).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_remove_changes_only_downstream_hidden_states(llama_session, small_data_spec):
    plan = CheckupPlan(modifications=["remove"], targets=["1"], knowledge=False)
    report = checkup(llama_session, plan, llama_session.data(small_data_spec))
    cascade = report.probes[0].cascade
    assert cascade["rel_error"][0] == 0.0  # block 0 runs before the removed block
    assert cascade["rel_error"][1] > 0.1 and cascade["rel_error"][2] > 0.1
    attention = report.probes[0].attention
    assert attention["js"][0] == pytest.approx(0.0, abs=1e-7)
    assert np.isnan(attention["js"][1])  # the removed block has no attention
    assert attention["js"][2] > 0


def test_unknown_modification_is_a_plan_error():
    with pytest.raises(PlanError, match="Unknown modification"):
        create("int9")


@pytest.mark.parametrize("name", ["int4-g32-asym", "int3", "int8-b128", "int4-b32", "int8-dynamic"])
def test_quantizing_rows_a_chunk_at_a_time_changes_no_value(monkeypatch, name):
    """Large weights (an LM head) are quantized a few rows at a time to bound the temporaries;
    every row is quantized on its own, so the result is the same to the bit."""
    import modeldoctor.modifications.quantize as quantize

    torch.manual_seed(0)
    weight = torch.randn(37, 200) * torch.rand(37, 1)
    whole = create(name).new_weight(None, "x", weight.clone())
    monkeypatch.setattr(quantize, "CHUNK_VALUES", 3 * 200 + 17)  # 3 rows a chunk, the last one short
    assert torch.equal(create(name).new_weight(None, "x", weight.clone()), whole)
    # written into the live weight itself, as a probe applies it (no second full-size matrix)
    live = weight.clone()
    create(name).rewrite(None, "x", live)
    assert torch.equal(live, whole)
    live = weight.t().contiguous().t()  # a transposed view, as GPT-2's Conv1D weights are seen
    create(name).rewrite(None, "x", live)
    assert torch.equal(live, whole)
