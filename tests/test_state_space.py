"""State-space (Mamba, Mamba2, FalconMamba) and hybrid (Bamba: Mamba2 mixers and attention)
models: the anatomy finds their mixers and linears, every weight and structural modification
changes their output and restores them bit-exact, a checkup probes them (two stages included),
the plan says what does not apply and why, cached generation survives remove / duplicate, and
the ONNX export says up front that it cannot write them."""

import json
import math

import numpy as np
import pytest
import torch

from test_structure_cache import PROMPT, greedy, targets_of
from tiny_models import SSM_CONFIGS, save_model
from modeldoctor.checkup.diagnosis import diagnose
from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.checkup.run import checkup
from modeldoctor.cli import main
from modeldoctor.errors import PlanError
from modeldoctor.events import Failed, Finished
from modeldoctor.export.pipeline import export_model
from modeldoctor.metrics import decoding as decoding_metrics
from modeldoctor.modifications.base import create
from modeldoctor.modifications.decoding import DecodingSettings
from modeldoctor.report import CheckupReport
from modeldoctor.report.html import render_html
from modeldoctor.session import Session

SSM_FAMILIES = sorted(SSM_CONFIGS)
PURE_SSM = ["falcon_mamba", "mamba", "mamba2"]
MIXER_LINEARS = {
    "mamba": ["mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"],
    "falcon_mamba": ["mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"],
    "mamba2": ["mixer.in_proj", "mixer.out_proj"],
}
HYBRID_MIXER_LINEARS = {"bamba": ["mamba.in_proj", "mamba.out_proj"],
                        "jamba": ["mamba.in_proj", "mamba.x_proj", "mamba.dt_proj", "mamba.out_proj"]}
MLP = ["feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"]
ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
# Weight modifications of every kind (quantization, unstructured, 2:4 and structured pruning)
# and both structural changes.
MODIFICATIONS = ["int8-dynamic", "int4", "int4-g32-asym", "prune-mag-50", "prune-wanda-50", "prune-2of4",
                 "prune-grad-50", "prune-heads-25", "prune-channels-25", "remove", "duplicate"]


@pytest.fixture(scope="module")
def ssm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssm_models")
    return {family: save_model(family, root / family) for family in SSM_FAMILIES}


@pytest.fixture(scope="module")
def sessions(ssm_dirs):
    return {family: Session.open(ssm_dirs[family]) for family in SSM_FAMILIES}


@pytest.mark.parametrize("family", PURE_SSM)
def test_anatomy_finds_the_mixer_linears_in_run_order(sessions, family):
    session = sessions[family]
    anatomy = session.anatomy
    assert anatomy.kind == "state-space"
    for part in anatomy.blocks:
        assert list(part.linears) == MIXER_LINEARS[family]
        assert part.kind == "state-space" and part.mixer_name == "mixer"
        # No attention and no MLP: the mixer's out_proj is neither projection.
        assert part.attention_name is None and part.attention_out is None and part.mlp_down is None
    assert anatomy.tail_names == ["backbone.norm_f"]
    lines = dict(session.summary.lines())
    assert lines["Blocks"] == "3 state-space (Mamba) blocks, no attention"
    assert lines["Hidden size / heads"] == "32 / no attention"


@pytest.mark.parametrize("family", sorted(HYBRID_MIXER_LINEARS))
def test_hybrid_anatomy_tells_attention_blocks_from_mamba_blocks(sessions, family):
    session = sessions[family]
    anatomy = session.anatomy
    assert anatomy.kind == "hybrid"
    assert anatomy.blocks_of_kind("state-space") == [0, 2] and anatomy.blocks_of_kind("attention") == [1, 3]
    for index in (0, 2):
        part = anatomy.blocks[index]
        assert list(part.linears) == HYBRID_MIXER_LINEARS[family] + MLP
        assert part.mixer_name == "mamba" and part.attention_out is None
        assert part.mlp_name == "feed_forward" and part.mlp_down == "feed_forward.down_proj"
    for index in (1, 3):
        part = anatomy.blocks[index]
        assert list(part.linears) == ATTENTION + MLP
        assert part.attention_name == "self_attn" and part.attention_out == "self_attn.o_proj"
        assert part.mixer_name is None and part.mlp_down == "feed_forward.down_proj"
    assert dict(session.summary.lines())["Blocks"] == "4, hybrid: 2 attention + 2 state-space (Mamba) blocks"


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_every_modification_changes_then_restores_bit_exact(sessions, small_data_spec, family):
    session = sessions[family]
    data = session.data(small_data_spec)
    ids = data.eval_batches[0].input_ids
    reference = session.model(input_ids=ids).logits
    before = session.weights_digest()
    blocks = list(session.anatomy.block_list)
    tried = 0
    for name in MODIFICATIONS:
        mod = create(name)
        ctx = session.mod_context(data, mod.needs_input_norms, need_gradients=mod.needs_gradients)
        for target in [str(b.index) for b in session.anatomy.blocks if mod.applies_to(session.anatomy, str(b.index))]:
            with mod.applied(ctx, [target]):
                changed = session.model(input_ids=ids).logits
            assert not torch.equal(changed, reference), f"{name} @ {target} changed nothing"
            assert session.weights_digest() == before, f"{name} @ {target} did not restore"
            assert all(a is b for a, b in zip(session.anatomy.block_list, blocks))
            tried += 1
    assert tried >= len(session.anatomy.blocks) * (len(MODIFICATIONS) - 2)
    torch.testing.assert_close(session.model(input_ids=ids).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mamba", "bamba", "jamba"])
def test_linear_scope_probes_each_mixer_linear(sessions, small_data_spec, family):
    session = sessions[family]
    data = session.data(small_data_spec)
    ids = data.eval_batches[0].input_ids
    reference = session.model(input_ids=ids).logits
    before = session.weights_digest()
    mixer = [n for n in session.anatomy.linear_names() if ".mixer." in n or ".mamba." in n]
    expected = {**MIXER_LINEARS, **HYBRID_MIXER_LINEARS}[family]
    assert sorted({n.split(".", 1)[1] for n in mixer}) == sorted(expected)
    for name in mixer:
        with create("int2").applied(session.mod_context(), [name]):
            assert not torch.equal(session.model(input_ids=ids).logits, reference), name
    assert session.weights_digest() == before


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_restore_after_exception(sessions, family):
    session = sessions[family]
    before = session.weights_digest()
    for name in ("int2", "remove", "duplicate"):
        with pytest.raises(RuntimeError):
            with create(name).applied(session.mod_context(), ["0", "2"]):
                raise RuntimeError("boom")
    assert session.weights_digest() == before


def test_plan_says_what_does_not_apply_and_why(sessions):
    anatomy = sessions["mamba"].anatomy
    plan = CheckupPlan(modifications=["int4", "prune-heads-25", "prune-channels-25", "remove"])
    probes, skipped = build_probes(plan, anatomy)
    assert {p.modification for p in probes} == {"int4", "remove"}
    assert ("prune-heads-25 does not apply to the state-space (Mamba) blocks 0, 1, 2 (all of them): "
            "they have no attention heads.") in skipped
    assert ("prune-channels-25 does not apply to the state-space (Mamba) blocks 0, 1, 2 (all of them): "
            "they have no MLP.") in skipped
    assert any(note.startswith("Attention disruption is not available") for note in skipped)
    with pytest.raises(PlanError, match="they have no attention heads"):
        build_probes(CheckupPlan(modifications=["prune-heads-25"]), anatomy)

    hybrid = sessions["bamba"].anatomy
    probes, skipped = build_probes(CheckupPlan(modifications=["prune-heads-25", "prune-channels-25", "remove"]),
                                   hybrid)
    assert [p.targets for p in probes if p.modification == "prune-heads-25"] == [("1",), ("3",)]
    assert len([p for p in probes if p.modification == "prune-channels-25"]) == 4
    assert skipped == ["prune-heads-25 does not apply to the state-space (Mamba) blocks 0, 2: "
                       "they have no attention heads."]


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_checkup_probes_every_modification(sessions, small_data_spec, family):
    session = sessions[family]
    before = session.weights_digest()
    plan = CheckupPlan(modifications=MODIFICATIONS, exhaustive=True, knowledge=False)
    report = checkup(session, plan, session.data(small_data_spec))
    assert report.status == "completed"
    assert session.weights_digest() == before
    probed = {(p.spec.modification, p.spec.targets[0]) for p in report.probes}
    for name in MODIFICATIONS:
        mod = create(name)
        expected = {(name, str(b.index)) for b in session.anatomy.blocks if mod.applies_to(session.anatomy, str(b.index))}
        assert {k for k in probed if k[0] == name} == expected
    # A probe that changed nothing would measure a KL of exactly 0.
    assert all(p.metrics["kl_mean"] > 0 for p in report.probes), [p.spec.label for p in report.probes
                                                                  if not p.metrics["kl_mean"] > 0]
    structural = [p for p in report.probes if p.spec.family == "structure"]
    if family in HYBRID_MIXER_LINEARS:  # attention disruption where there is attention, none in the Mamba blocks
        for record in structural:
            js = record.attention["js"]
            assert math.isnan(js[0]) and math.isnan(js[2])
        assert any(not math.isnan(r.attention["js"][3]) for r in structural if r.spec.targets[0] in ("0", "1"))
    else:
        assert all(not r.attention for r in structural)
        assert any("prune-heads-25 does not apply" in n for n in report.plan["notes"])
        titles = [f.title for f in diagnose(report)]
        assert "Notes on the plan for this model" in titles


def test_hybrid_diagnosis_and_report_name_the_kind_of_each_bleeding_block(sessions, small_data_spec, tmp_path):
    session = sessions["bamba"]
    report = checkup(session, CheckupPlan(modifications=["remove"], knowledge=False, threshold=1e-6),
                     session.data(small_data_spec))
    finding = next(f for f in diagnose(report) if f.title.startswith("remove"))
    assert "blocks 0–3 (state-space (Mamba): 0, 2; attention: 1, 3)" in finding.text, finding.text
    page = render_html(CheckupReport.load(report.save(tmp_path)))  # what was saved, read back
    assert "4 blocks (hybrid: 2 attention + 2 state-space)" in page
    assert "state-space (Mamba): 0, 2; attention: 1, 3" in page


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_two_stage_estimate_works_on_mixer_blocks(sessions, small_data_spec, family):
    session = sessions[family]
    plan = CheckupPlan(modifications=["int3", "int8"], knowledge=False, verify_top=1, control_sample=0,
                       verify_fraction=1e9)
    report = checkup(session, plan, session.data(small_data_spec))
    estimated = [p for p in report.probes if p.estimated]
    measured = [p for p in report.probes if not p.estimated]
    assert estimated and measured
    assert all(np.isfinite(p.score) and p.score > 0 for p in report.probes)
    # int3 damages more than int8 in the estimate too.
    score = {(p.spec.modification, p.spec.targets[0]): p.score for p in report.probes}
    assert all(score[("int3", t)] > score[("int8", t)] for _, t in score)


@pytest.mark.parametrize("family", SSM_FAMILIES)
@pytest.mark.parametrize("action", ["duplicate", "remove"])
def test_cached_generation_equals_uncached_under_structure_change(sessions, family, action):
    session = sessions[family]
    original = greedy(session.model, use_cache=False)
    before = session.weights_digest()
    for targets in targets_of(session):
        with create(action).applied(session.mod_context(), targets):
            uncached = greedy(session.model, use_cache=False)
            cached = greedy(session.model, use_cache=True)
        assert uncached != original, f"{action}@{targets} changed nothing"
        assert cached == uncached, f"{action}@{targets}: cached generation drifts from uncached"
    assert session.weights_digest() == before
    assert greedy(session.model, use_cache=True) == original


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_cli_checkup_probes_every_modification_and_says_what_was_left_out(ssm_dirs, tmp_path, capsys, family):
    code = main(["checkup", str(ssm_dirs[family]), "--modify", ",".join(MODIFICATIONS), "--tokens", "128",
                 "--seq-len", "64", "--calibration-tokens", "128", "--no-knowledge", "--exhaustive",
                 "--top", "100", "--out", str(tmp_path / "res"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    saved = json.loads((tmp_path / "res" / "checkup.json").read_text())
    probed = {(p["spec"]["modification"], p["spec"]["targets"][0]) for p in saved["probes"]}
    heads = {"1", "3"} if family in HYBRID_MIXER_LINEARS else set()
    channels = {"0", "1", "2", "3"} if family in HYBRID_MIXER_LINEARS else set()
    for name in MODIFICATIONS:
        blocks = heads if name == "prune-heads-25" else channels if name == "prune-channels-25" else \
            {str(b) for b in range(SSM_CONFIGS[family]["num_hidden_layers"])}
        assert {t for m, t in probed if m == name} == blocks, name
    assert all(p["metrics"]["kl_mean"] > 0 for p in saved["probes"])
    assert "prune-heads-25 does not apply to the state-space (Mamba) blocks " in out
    assert "duplicate @ 2" in out and "remove @ 0" in out and "int4 @ 0" in out


def test_cli_info_says_what_the_blocks_are(ssm_dirs, capsys):
    assert main(["info", str(ssm_dirs["bamba"])]) == 0
    assert "4, hybrid: 2 attention + 2 state-space (Mamba) blocks" in capsys.readouterr().out
    assert main(["info", str(ssm_dirs["mamba"])]) == 0
    assert "3 state-space (Mamba) blocks, no attention" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["mamba", "bamba"])
def test_export_refuses_up_front_with_the_reason(sessions, ssm_dirs, small_data_spec, tmp_path, capsys, family):
    session = sessions[family]
    events = list(export_model(session, session.data(small_data_spec), tmp_path / "out", "int8"))
    failed = [e for e in events if isinstance(e, Failed)]
    assert failed and "ONNX export is not available" in failed[0].message
    assert isinstance(events[-1], Finished) and not (tmp_path / "out").exists()
    assert main(["export", str(ssm_dirs[family]), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "ONNX export is not available" in err and "optimum-onnx has no exporter" in err
    assert "Traceback" not in err and not (tmp_path / "cli").exists()


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_beam_search_probe_decodes_what_the_model_does_without_a_cache(sessions, family):
    """transformers' beam search does not reorder a Mamba model's cache_params; the decoding probe
    must not measure that artefact."""
    session = sessions[family]
    settings = DecodingSettings(num_beams=4)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        uncached = session.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                          min_new_tokens=12, use_cache=False, pad_token_id=0,
                                          **settings.generate_kwargs())[0, len(PROMPT):].tolist()
    assert decoding_metrics.generate(session.model, session.tokenizer, PROMPT, settings, 12) == uncached


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_replaying_from_any_block_reproduces_the_model(sessions, small_data_spec, family):
    """The prefix cache holds for recurrent mixers: each block's recorded call, replayed from any
    block onward, gives the model's own logits (padding included)."""
    session = sessions[family]
    batch = session.data(small_data_spec).eval_batches[0]
    trace, logits = session.replayer.trace(batch)
    for start in range(session.anatomy.num_blocks + 1):
        replayed = session.replayer.run_from(trace, start, keep_states=False).logits
        torch.testing.assert_close(replayed, logits, rtol=0, atol=1e-5)
