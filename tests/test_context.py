import pytest
import torch

from modeldoctor.checkup.context import usable_lengths
from modeldoctor.checkup.diagnosis import context_curves, diagnose
from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.checkup.run import checkup
from modeldoctor.data import DataSpec
from modeldoctor.metrics.divergence import DivergenceAccumulator, RefLogProbs, kl_by_position
from modeldoctor.modifications.base import create
from modeldoctor.report.results import CheckupReport
from modeldoctor.session import Session


def test_kl_by_position_puts_each_token_in_its_bucket():
    kl = torch.tensor([1.0, 1.0, 3.0, 5.0]).numpy()
    positions = torch.tensor([0, 63, 64, 300]).numpy()
    assert kl_by_position(kl, positions) == {"kl_pos_0_63": 1.0, "kl_pos_64_255": 3.0, "kl_pos_256_1023": 5.0}


def test_positions_count_real_tokens_only():
    """Right padding is no position: a padded row's tokens keep their own positions."""
    torch.manual_seed(0)
    logits = torch.randn(2, 70, 11)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 60:] = 0
    ids = torch.randint(0, 11, (2, 70))
    acc = DivergenceAccumulator()
    ref = RefLogProbs.from_logits(logits)
    acc.add(ref, torch.zeros(2, 69), logits + torch.randn(2, 70, 11), ids, mask)
    assert sorted(acc.positions[0].tolist()) == sorted(list(range(70)) + list(range(60)))
    figures = acc.summary()
    assert {"kl_pos_0_63", "kl_pos_64_255"} <= set(figures)


def test_usable_lengths_stop_at_the_text_and_add_the_model_limit():
    assert usable_lengths((128, 256, 4096), 1000, 512) == [128, 256, 512, 1000]
    assert usable_lengths((128, 256), 1000, 4096) == [128, 256]
    assert usable_lengths((128, 2048), 4096, 8192) == [128, 2048]


@pytest.mark.parametrize("name", ["rope-linear-2", "rope-ntk-4", "rope-yarn-4"])
def test_rope_scaling_changes_the_output_and_restores_it(llama_session, name):
    ids = torch.arange(3, 80)[None]
    rotary = llama_session.anatomy.rotaries[0]
    before = rotary.inv_freq.clone(), rotary.attention_scaling
    reference = llama_session.model(input_ids=ids).logits
    with create(name).applied(llama_session.mod_context(), []):
        changed = llama_session.model(input_ids=ids).logits
    assert not torch.equal(changed, reference)
    assert torch.equal(rotary.inv_freq, before[0]) and rotary.attention_scaling == before[1]
    torch.testing.assert_close(llama_session.model(input_ids=ids).logits, reference, rtol=0, atol=0)


def test_rope_scaling_is_skipped_with_a_reason_on_learned_positions(model_dirs):
    session = Session.open(model_dirs["gpt2"])
    probes, skipped = build_probes(CheckupPlan(modifications=["rope-linear-2", "int8"]), session.anatomy)
    assert all(p.modification == "int8" for p in probes)
    assert any("rope-linear-2 does not apply" in note and "rotary" in note for note in skipped)


def test_a_long_context_checkup_measures_each_length_and_says_on_what(llama_session, tmp_path):
    data = llama_session.data(DataSpec(tokens=768, seq_len=256, calibration_tokens=128, selection_tokens=128,
                                       batch_size=3, knowledge=False))
    plan = CheckupPlan(modifications=["rope-linear-4", "kv-int2", "remove"], knowledge=False,
                       context_lengths=(128, 256, 768))
    report = checkup(llama_session, plan, data)
    context = report.context
    assert context["lengths"] == [128, 256, 512, 768]  # the tiny model's limit (512) added
    assert set(context["curves"]) == {"rope-linear-4", "kv-int2"}  # removing every block means nothing
    assert all(len(c["kl"]) == 4 and min(c["kl"]) > 0 for c in context["curves"].values())
    assert all(rate > 0 for rate in context["tokens_per_s"])
    assert "kl_pos_256_1023" in context["curves"]["kv-int2"]["by_position"][-1]
    whole = report.by_mode("model")
    assert len(whole) == 1 and whole[0].score > 0
    assert set(context_curves(report)) == {"kv-int2", "remove"}
    titles = [f.title for f in diagnose(report)]
    assert any(t.startswith("Long-context probe: damage") for t in titles) and "rope-linear-4 (whole model)" in titles
    report.save(tmp_path)
    assert CheckupReport.load(tmp_path).context == CheckupReport.from_dict(report.to_dict()).context
    assert CheckupReport.load(tmp_path).context["lengths"] == [128, 256, 512, 768]


def test_the_planned_duration_counts_the_long_context_probe(llama_session):
    from modeldoctor.checkup.timing import context_stage_tokens, planned_duration

    plan = CheckupPlan(modifications=["int8", "kv-int4", "remove"], knowledge=False)
    longer = CheckupPlan(modifications=["int8", "kv-int4", "remove"], knowledge=False, context_lengths=(128, 512, 4096))
    assert context_stage_tokens(longer, 1024) == (128 + 512 + 1024) * 3  # the original, int8 and kv-int4
    probes, _ = build_probes(plan, llama_session.anatomy)
    base = planned_duration(llama_session.anatomy, plan, probes, 1e-3, 1024, 0, len(probes))
    more = planned_duration(llama_session.anatomy, longer, probes, 1e-3, 1024, 0, len(probes))
    assert more.low > base.low and more.high > base.high


def test_the_long_context_probe_applies_each_modification_once(llama_session, monkeypatch):
    """Applying a modification can cost more than a pass (an SVD of every linear): the probe
    applies each once and runs every length under it, against the same figures."""
    from modeldoctor.modifications.lowrank import LowRank

    data = llama_session.data(DataSpec(tokens=768, seq_len=256, calibration_tokens=128, selection_tokens=128,
                                       batch_size=3, knowledge=False))
    calls = []
    original = LowRank.new_weight
    monkeypatch.setattr(LowRank, "new_weight", lambda self, ctx, name, w: calls.append(name) or original(self, ctx, name, w))
    plan = CheckupPlan(modifications=["svd-r25"], knowledge=False, targets=["2"], context_lengths=(128, 256, 768))
    report = checkup(llama_session, plan, data)
    linears = len(llama_session.anatomy.linear_names())
    per_block = linears // llama_session.anatomy.num_blocks
    assert len(calls) == per_block + linears  # the probe of block 2, then the whole model once
    kl = report.context["curves"]["svd-r25"]["kl"]
    assert len(kl) == 4 and min(kl) > 0


def test_a_rope_factor_under_one_is_a_clear_plan_error(tmp_path):
    from modeldoctor.cli import main

    with pytest.raises(Exception, match="1 or more"):
        create("rope-linear-0")
    assert main(["checkup", "sample", "--modify", "rope-yarn-0.5", "--out", str(tmp_path)]) == 2
