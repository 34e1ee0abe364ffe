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


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_a_shared_table_probe_changes_the_embedding_too_and_restores_bit_exact(model_dirs, family):
    """A block format on a tied head is the export's one shared table: the lookup reads it too."""
    session = Session.open(model_dirs[family])
    anatomy = session.anatomy
    assert anatomy.head_tied
    ids = torch.randint(3, 300, (1, 16))
    before, digest = logits(session, ids), session.weights_digest()
    embedding = anatomy.embedding.weight.detach().clone()
    mod = create("int8-b32")
    assert mod.changes_embedding(anatomy, HEAD) and not mod.changes_embedding(anatomy, anatomy.linear_names()[0])
    assert create("int4-b32").changes_embedding(anatomy, HEAD) and create("int4-b128").changes_embedding(anatomy, HEAD)
    assert not create("int8-g32-asym").changes_embedding(anatomy, HEAD)
    with mod.applied(session.mod_context(), [HEAD]):
        assert not torch.equal(anatomy.embedding.weight, embedding)
        assert anatomy.head.weight is anatomy.embedding.weight
        assert not torch.equal(logits(session, ids), before)
    assert session.weights_digest() == digest and anatomy.head_tied
    torch.testing.assert_close(logits(session, ids), before, rtol=0, atol=0)
    # The prefix cache cannot reuse the states entering block 0 when the embedding changed.
    data = session.data(SPEC)
    plans = [CheckupPlan(modifications=["int8-b32"], scope="linears", targets=[HEAD], knowledge=False,
                         prefix_cache=cached, exhaustive=True) for cached in (True, False)]
    cached, full = (checkup(session, plan, data) for plan in plans)
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


@pytest.mark.parametrize("family, fmt", [(family, fmt) for family in ("llama", "gpt2", "gemma")
                                         for fmt in ("int4", "int8")] + [("gpt2", "int4-b128"), ("gemma", "int4-b128")])
def test_the_simulation_of_every_linear_is_what_the_export_computes(model_dirs, tmp_path, family, fmt):
    """Prediction and export agree: int4-b32 / int8-b32 / int4-b128 applied in torch to every
    linear target (the head too, tied or not: a tied head is the shared table the embedding
    lookup reads as well; the tiny models' 32-wide inputs fill a block of 128 only in part)
    but the kept ones gives the exported model's logits."""
    from modeldoctor.export.pipeline import PREDICTORS

    session = Session.open(model_dirs[family])
    data = session.data(SPEC)
    keep = [session.anatomy.linear_names()[1]]
    formats = {name: "fp32" if name in keep else fmt for name in session.anatomy.linear_targets()}
    precision = fmt.split("-")[0]
    events = list(export_model(session, data, tmp_path / "out", precision, formats=formats, budget_kl=100.0,
                               prompts=["Hi"]))
    assert events[-1].reason == "completed"
    exported = OnnxCausalLM(tmp_path / "out" / "model.onnx")
    import modeldoctor.modifications.quantize as quantize

    def simulate(name: str, seq, noise: float = 0.0):
        exact = quantize.quantize_activation_blocks
        if noise:  # the same simulation with its activations a last bit or so off
            generator = torch.Generator().manual_seed(0)
            quantize.quantize_activation_blocks = lambda x, block=32: exact(
                x * (1 + noise * torch.randn(x.shape, generator=generator)), block)
        try:
            with create(name).applied(session.mod_context(keep=frozenset(keep)), session.anatomy.linear_targets()):
                return logits(session, torch.from_numpy(seq))
        finally:
            quantize.quantize_activation_blocks = exact

    def mean_gap(a, b):  # the largest logit difference per position, averaged
        return float((a - b).abs().amax(-1).mean())

    shift, gap, floor, weights_only = [], [], [], []
    for seq in sequences(data)[:2]:
        onnx_logits = torch.from_numpy(exported.logits(seq))
        simulated = simulate(PREDICTORS[fmt], seq)
        shift.append(mean_gap(logits(session, torch.from_numpy(seq)), onnx_logits))
        gap.append(mean_gap(simulated, onnx_logits))
        floor.append(mean_gap(simulated, simulate(PREDICTORS[fmt], seq, noise=1e-6)))
        weights_only.append(mean_gap(simulate(PREDICTORS[fmt].replace("-b", "-g") + "-asym", seq), onnx_logits))
    shift, gap, floor, weights_only = (float(np.mean(v)) for v in (shift, gap, floor, weights_only))
    assert shift > (0.05 if precision == "int4" else 0.002)  # quantizing moves the logits ...
    # ... as the simulation says: exactly (float accumulation) until an int8 activation that sits on
    # a rounding boundary flips by one step, which a last-bit difference anywhere upstream also does
    # to the simulation itself; a 32-wide test model shows such flips (the sample hardly does). So
    # the file is no further from the simulation than the simulation is from itself ...
    assert gap <= 1.5 * floor + 1e-4, (gap, floor)
    # ... and much closer than a simulation of the weights alone.
    assert gap < 0.5 * weights_only, (gap, weights_only)


def test_the_checkup_predicts_the_heads_share_of_the_export(llama_session, tmp_path):
    data = llama_session.data(SPEC)
    report = checkup(llama_session, CheckupPlan(modifications=["int8-dynamic"], scope="linears", knowledge=False),
                     data)
    head = next(p for p in report.probes if p.spec.targets == (HEAD,))
    assert head.score > 0
    kept = [HEAD]
    events = list(export_model(llama_session, data, tmp_path / "kept", "int8-dynamic", report, exclude=kept,
                               budget_kl=100.0, prompts=["Hi"]))
    quantized = list(export_model(llama_session, data, tmp_path / "all", "int8-dynamic", report, exclude=[],
                                  budget_kl=100.0, prompts=["Hi"]))
    kept_result, all_result = events[-1].report, quantized[-1].report
    assert all_result.predicted_kl - kept_result.predicted_kl == pytest.approx(head.score)
    # Quantizing the head costs the export about what its probe said.
    measured = all_result.validation["kl_mean"] - kept_result.validation["kl_mean"]
    assert measured > 0
    assert np.isclose(measured, head.score, rtol=0.5)


@pytest.mark.parametrize("family", sorted(TIED))
def test_a_tied_head_stays_fp32_in_a_dynamic_export_unless_a_keep_list_says_otherwise(model_dirs, tmp_path, family):
    """In an int8-dynamic export keeping a tied head costs nothing (the embedding keeps its fp32
    weight anyway), so the preset keeps it; an untied head is quantized like the block linears."""
    from tests.export.test_keep_lists import float_linears

    session = Session.open(model_dirs[family])
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", "int8-dynamic", budget_kl=100.0,
                               prompts=["Hi"]))
    result = events[-1].report
    assert events[-1].reason == "completed"
    assert result.excluded_linears == ([HEAD] if TIED[family] else [])
    assert float_linears(tmp_path / "out" / "model.onnx", session) == set(result.excluded_linears)


@pytest.mark.parametrize("head_format", ["int8", "int4", "int8-b128"])
@pytest.mark.parametrize("family", sorted(TIED))
def test_an_export_stores_a_tied_table_once_in_the_heads_format(model_dirs, tmp_path, family, head_format):
    import onnx

    from modeldoctor.export import BLOCK_FORMATS

    session = Session.open(model_dirs[family])
    events = list(export_model(session, session.data(SPEC), tmp_path / "out", "int8", budget_kl=100.0,
                               prompts=["Hi"], formats={HEAD: head_format}))
    result = events[-1].report
    assert events[-1].reason == "completed" and result.excluded_linears == []
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    lookups = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    floats = [i for i in graph.initializer if tuple(i.dims) == tuple(session.anatomy.embedding.weight.shape)]
    if TIED[family]:
        head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head"))
        bits, block = BLOCK_FORMATS[head_format]
        assert len(lookups) == 1 and {a.name: a.i for a in lookups[0].attribute}["bits"] == bits
        # One table read by both: the lookup reads the head's packed weights as rows.
        rows = next(n for n in graph.node if n.output[0] == lookups[0].input[0])
        assert rows.op_type == "Reshape" and rows.input[0] == head.input[1]
        assert {a.name: a.i for a in head.attribute}["block_size"] == block
        assert not floats  # no fp32 copy of the table is left
        # Nor a second copy of its scales or zero points: the file stores no large array twice.
        large = [i.raw_data for i in graph.initializer if len(i.raw_data) >= 1024]
        assert len(set(large)) == len(large)
    else:
        assert not lookups and len(floats) == 1  # an untied embedding stays fp32


@pytest.mark.parametrize("fmt", ["int8-b64", "int4-b128"])
def test_each_linear_alone_in_a_larger_block_is_what_its_probe_simulates(llama_session, tmp_path, fmt):
    """One linear at a time in the file (an attention input, an MLP output, the untied head):
    the exported logits equal the probe's to float accumulation. All at once, a 32-wide model's
    rounding-boundary flips compound (the whole-model comparison above runs on block 32 and on
    the tied 4-bit tables)."""
    from modeldoctor.export.pipeline import PREDICTORS

    session = llama_session
    data = session.data(SPEC)
    seq = sequences(data)[0]
    for name in ("1.self_attn.v_proj", "0.mlp.down_proj", HEAD):
        formats = {n: "fp32" for n in session.anatomy.linear_targets()} | {name: fmt}
        out = tmp_path / name
        events = list(export_model(session, data, out, "int8", formats=formats, budget_kl=100.0, prompts=["Hi"]))
        assert events[-1].reason == "completed"
        exported = torch.from_numpy(OnnxCausalLM(out / "model.onnx").logits(seq))
        with create(PREDICTORS[fmt]).applied(session.mod_context(), [name]):
            simulated = logits(session, torch.from_numpy(seq))
        gap = float((simulated - exported).abs().amax(-1).mean())
        shift = float((logits(session, torch.from_numpy(seq)) - exported).abs().amax(-1).mean())
        assert gap < 1e-4 and shift > 100 * gap, (name, gap, shift)
