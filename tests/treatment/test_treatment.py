"""Treatments on tiny random models: the invariants each mitigation must keep, composition,
rollback on cancel, reset, saving, the CLI and the hand-over to the export."""

import itertools
import json
import math

import pytest
import torch
from onnx_graph import float_matmul_weights, linear_digest

from modeldoctor.control import RunControl
from modeldoctor.errors import ModelDoctorError, PlanError
from modeldoctor.events import Finished, Progress, TreatmentResult
from modeldoctor.metrics.divergence import RefLogProbs
from modeldoctor.modifications.base import create
from modeldoctor.session import Session
from modeldoctor.treatment.base import TreatmentPlan, treatments
from modeldoctor.treatment.decoding import fit_temperature
from modeldoctor.treatment.knowledge import score, split_probes, with_prompt
from modeldoctor.treatment.mixed import choose_kept
from modeldoctor.treatment.run import run_treatments, treat
from modeldoctor.treatment.scaling import apply_scaling, find_scale_groups, fold


def logits_of(session, data):
    ids = data.eval_batches[0].input_ids
    with torch.inference_mode():
        return session.model(input_ids=ids, attention_mask=data.eval_batches[0].attention_mask).logits


def batch_logits(session, batches):
    with torch.inference_mode():
        return [session.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batches]


def token_kl(reference, modified, batches) -> float:
    """Mean KL(reference ‖ modified) in nats over the real (unpadded) tokens of the batches."""
    values = []
    for ref, mod, batch in zip(reference, modified, batches):
        logp, logq = torch.log_softmax(ref.double(), -1), torch.log_softmax(mod.double(), -1)
        values.append((logp.exp() * (logp - logq)).sum(-1)[batch.attention_mask.bool()])
    return float(torch.cat(values).mean())


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2"])
def test_folded_scales_leave_the_float_model_unchanged(model_dirs, small_data_spec, family):
    session = Session.open(model_dirs[family])
    data = session.data(small_data_spec)
    before = logits_of(session, data)
    groups = find_scale_groups(session, data.calibration_batches[0])
    assert groups, f"no scale group found in {family}"
    generator = torch.Generator().manual_seed(0)
    for group in groups:
        width = session.anatomy.linear(group.consumers[0]).weight.shape[-1] if family != "gpt2" else None
        width = width or session.anatomy.hidden_size
        fold(session, group, torch.rand(width, generator=generator) * 4 + 0.25)
    torch.testing.assert_close(logits_of(session, data), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_neox"])
@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_searched_scaling_keeps_logits_to_1e5(model_dirs, small_data_spec, method, family):
    """Also where a producer does not scale linearly (Gemma's 1 + w norm): that fold is skipped."""
    session = Session.open(model_dirs[family])
    data = session.data(small_data_spec)
    before = logits_of(session, data)
    summary = apply_scaling(session, data, method, bits=4, group_size=32, symmetric=False)
    assert summary["groups"] > 0
    torch.testing.assert_close(logits_of(session, data), before, rtol=1e-5, atol=1e-5)


def _plant_activation_outliers(session, factor=40.0, channels=(3, 17)):
    """Scale a few channels of every attention norm up and the q/k/v columns down: the float
    model is unchanged, but its activations now carry outliers, as real LLMs' do."""
    with torch.no_grad():
        for part in session.anatomy.blocks:
            norm = part.module.get_submodule(part.norms[0])
            for c in channels:
                norm.weight[c] *= factor
            for rel in part.linears:
                if rel.startswith(part.attention_name + ".") and rel != part.attention_out:
                    for c in channels:
                        part.linears[rel].weight[:, c] /= factor


def test_smoothquant_lowers_int8_dynamic_kl_on_activation_outliers(llama_dir, small_data_spec):
    session = Session.open(llama_dir)
    _plant_activation_outliers(session)
    data = session.data(small_data_spec)
    report = treat(session, TreatmentPlan(["smoothquant"], target="int8-dynamic"), data)
    outcome = report.outcomes[0]
    assert outcome.applied, outcome.verdict
    assert outcome.after["kl_mean"] < 0.7 * outcome.before["kl_mean"]
    assert outcome.details["float_model_kl_after_fold"] < 1e-6
    assert len(outcome.layers["before"]) == len(outcome.layers["after"]) == session.anatomy.num_blocks


def test_gradient_pruning_hits_the_exact_sparsity_and_can_be_reset(llama_dir, llama_session, small_data_spec):
    session = llama_session
    digest = session.weights_digest()
    data = session.data(small_data_spec)
    report = treat(session, TreatmentPlan(["prune-grad"], target="none", sparsity=0.5), data)
    outcome = report.outcomes[0]
    assert {row["method"] for row in outcome.table} == {"magnitude", "Wanda", "gradient-aware"}
    for name in session.anatomy.linear_names():
        weight = session.anatomy.linear(name).weight
        assert int((weight == 0).sum()) == weight.numel() // 2, name
    assert not session.treatment.function_preserving
    # Measured here on a fresh copy of the untreated model, with a KL written in the test: each
    # method's selection-split figure is real, the written method has the lowest, and the
    # result's held-out figure is the pruned model's own KL from the original on the evaluation text.
    original = Session.open(llama_dir)
    fresh = original.data(small_data_spec)
    reference = batch_logits(original, fresh.selection_batches)
    selection_kl = {}
    for row in outcome.table:
        mod = create(row["modification"])
        ctx = original.mod_context(fresh, mod.needs_input_norms, need_gradients=mod.needs_gradients)
        with mod.applied(ctx, [str(b) for b in range(original.anatomy.num_blocks)]):
            selection_kl[row["modification"]] = token_kl(reference, batch_logits(original, fresh.selection_batches),
                                                         fresh.selection_batches)
        assert row["selection_kl"] == pytest.approx(selection_kl[row["modification"]], rel=1e-3), row["method"]
    assert outcome.details["written"] == min(selection_kl, key=selection_kl.get)
    held_out = token_kl(batch_logits(original, data.eval_batches), batch_logits(session, data.eval_batches),
                        data.eval_batches)
    assert outcome.after["kl_mean"] == pytest.approx(held_out, rel=1e-3)
    session.reset_treatments()
    assert session.weights_digest() == digest


def test_two_of_four_gradient_pruning_pattern(llama_session, small_data_spec):
    data = llama_session.data(small_data_spec)
    outcome = treat(llama_session, TreatmentPlan(["prune-grad"], target="none", pattern="2of4"), data).outcomes[0]
    assert {row["method"] for row in outcome.table} == {"Wanda", "gradient-aware"}
    for name in llama_session.anatomy.linear_names():
        weight = llama_session.anatomy.linear(name).weight
        groups = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
        assert torch.all(groups >= 2), name


def test_reference_stays_the_untreated_model(llama_session, small_data_spec):
    """A reference computed after pruning must still be the original model's."""
    session = llama_session
    data = session.data(small_data_spec)
    expected = logits_of(session, data)
    treat(session, TreatmentPlan(["prune-grad"], target="none"), data)
    from dataclasses import replace

    other = session.data(replace(small_data_spec, seed=1))  # a spec the session has no reference for yet
    with session.original_weights():
        torch.testing.assert_close(logits_of(session, data), expected, rtol=0, atol=0)
    ref = session.reference(other)
    with session.original_weights():
        trace, logits = session.replayer.trace(other.eval_batches[0])
    torch.testing.assert_close(ref.logprobs[0].argmax, logits.argmax(-1))


def test_temperature_fit_recovers_a_constructed_sharpening():
    torch.manual_seed(0)
    z = torch.randn(2, 16, 50) * 2
    ref = RefLogProbs.from_logits(z)
    mask = torch.ones(2, 16, dtype=torch.bool)
    temperature, before, after = fit_temperature([ref], [z * 1.8], [mask])
    assert temperature == pytest.approx(1.8, rel=1e-3)
    assert before > 0.05 and after < 1e-6


def test_temperature_calibration_lowers_kl_of_an_overconfident_model(llama_dir, small_data_spec):
    session = Session.open(llama_dir)
    data = session.data(small_data_spec)
    session.begin_weight_treatment()  # a "treated" model whose logits are 1.6× too sharp
    with torch.no_grad():
        session.anatomy.head.weight.mul_(1.6)
    session.weights_changed(function_preserving=False)
    report = treat(session, TreatmentPlan(["calibrate-temperature"], target="none", decoding="decode-temp-0.7"), data)
    outcome = report.outcomes[0]
    assert outcome.applied
    assert session.treatment.temperature == pytest.approx(1.6, rel=0.05)
    assert outcome.after["kl_mean"] < 0.1 * outcome.before["kl_mean"]
    assert [row["temperature"] for row in outcome.table][0] == 1.0


def test_knapsack_is_exact():
    sizes = {"a": 6, "b": 3, "c": 3, "d": 2, "e": 4}
    scores = {"a": 0.9, "b": 0.5, "c": 0.45, "d": 0.2, "e": 0.55}
    for capacity in range(0, 19):
        best = max((combo for r in range(6) for combo in itertools.combinations(sizes, r)
                    if sum(sizes[n] for n in combo) <= capacity), key=lambda c: sum(scores[n] for n in c))
        chosen = choose_kept(scores, sizes, capacity)
        assert sum(sizes[n] for n in chosen) <= capacity
        assert sum(scores[n] for n in chosen) == pytest.approx(sum(scores[n] for n in best))


def test_mixed_precision_keeps_within_budget_and_verifies(llama_session, small_data_spec):
    data = llama_session.data(small_data_spec)
    report = treat(llama_session, TreatmentPlan(["mixed-precision"], target="int4-g32-asym", budget=0.25), data)
    outcome = report.outcomes[0]
    anatomy = llama_session.anatomy
    assert not anatomy.head_tied  # the untied head is quantized by the export, so it is a candidate too
    sizes = {n: anatomy.linear(n).weight.numel() for n in anatomy.linear_targets()}
    kept = outcome.details["kept"]
    assert sum(sizes[n] for n in kept) <= 0.25 * sum(sizes.values())
    # Observable: keeping those linears in fp32 lowers the deployed model's KL on held-out text,
    # and the single most damaging linear (by an independent linear-scope checkup on the
    # selection text) is among them.
    assert outcome.applied and outcome.after["kl_mean"] < outcome.before["kl_mean"]
    assert llama_session.treatment.keep == kept and llama_session.treatment.keep_for == "int4-g32-asym"
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup

    scan = checkup(llama_session, CheckupPlan(modifications=["int4-g32-asym"], scope="linears", knowledge=False),
                   data.selection_view())
    worst = max(scan.probes, key=lambda p: p.score).spec.targets[0]
    assert worst in kept


def test_choices_never_read_the_evaluation_split(llama_dir, small_data_spec, monkeypatch):
    """Roll-back, keep lists, α, the best pruning method and the temperature are chosen on the
    selection split: scrambling every evaluation-split KL changes the reported figures but
    not one choice."""
    import modeldoctor.checkup.run as checkup_run

    def choices(scramble: bool):
        if scramble:
            honest = checkup_run.measure

            def scrambled(session, ref, data, plan, spec, *args, **kwargs):
                record = honest(session, ref, data, plan, spec, *args, **kwargs)
                if data.spec.split == "eval":
                    record.metrics["kl_mean"] = 1.0 / (1e-6 + record.metrics["kl_mean"])  # order reversed
                return record
            monkeypatch.setattr(checkup_run, "measure", scrambled)
        session = Session.open(llama_dir)
        _plant_activation_outliers(session)
        data = session.data(small_data_spec)
        quant = treat(session, TreatmentPlan(["smoothquant", "mixed-precision", "calibrate-temperature"],
                                             target="int8-dynamic", budget=0.2, decoding="decode-sample"), data)
        pruned = treat(session, TreatmentPlan(["prune-grad"], sparsity=0.5), data)
        monkeypatch.undo()
        return ([o.applied for o in quant.outcomes], session.treatment.keep, session.treatment.temperature,
                pruned.outcomes[0].details["alpha"], pruned.outcomes[0].details["written"],
                quant.outcomes[0].after["kl_mean"])

    honest, scrambled = choices(False), choices(True)
    assert honest[:-1] == scrambled[:-1]
    assert honest[-1] != scrambled[-1]  # the scramble did reach the reported figures


def test_mixed_precision_rejects_a_budget_nothing_fits(llama_session, small_data_spec):
    data = llama_session.data(small_data_spec)
    report = treat(llama_session, TreatmentPlan(["mixed-precision"], target="int8-dynamic", budget=0.001), data)
    assert not report.outcomes[0].applied and "Rejected" in report.outcomes[0].verdict
    assert llama_session.treatment.keep == []


def test_knowledge_scores_map_back_to_their_probes(llama_session, small_data_spec):
    session = llama_session
    probes = session.data(small_data_spec).knowledge_probes[:40]
    selection, evaluation = split_probes(probes, seed=0)
    assert not set(map(id, selection)) & set(map(id, evaluation)) and len(selection) + len(evaluation) == 40
    correct, confidence = score(session, with_prompt("Facts:", probes), RunControl())
    for index in (0, 7, 23):
        alone_correct, alone_confidence = score(session, with_prompt("Facts:", probes[index:index + 1]), RunControl())
        assert alone_correct[0] == correct[index]
        assert alone_confidence[0] == pytest.approx(confidence[index], rel=1e-4)


def _token(tokenizer, text):
    (token,) = tokenizer(text, add_special_tokens=False)["input_ids"]
    return token


def _make_a_bigram_model_answer_a(session):
    """Zero every block's output projections, so each prediction depends on the current token
    alone, then wire the head so that "s" is followed by " " and " " by "A": the model answers
    "A" to any question ending in "s", whatever comes before, and nothing else."""
    tokenizer, anatomy = session.tokenizer, session.anatomy
    with torch.no_grad():
        for part in anatomy.blocks:
            part.linears[part.attention_out].weight.zero_()
            part.linears[part.mlp_down].weight.zero_()
        embedding = session.model.get_input_embeddings().weight
        for before, after in (("s", " "), (" ", "A")):
            direction = embedding[_token(tokenizer, before)]
            anatomy.head.weight[_token(tokenizer, after)] += 60 * direction / direction.norm()


def test_recovery_prompts_report_the_accuracies_of_a_model_whose_answers_are_known(
        llama_session, small_data_spec, monkeypatch):
    """40 probes; the model knows exactly those whose answer is "A": 15 of the 20 held-out ones
    and 5 of the 20 selection ones. No prompt can change a bigram model's answer, and int3 leaves
    zeroed projections zero, so every held-out accuracy is 75 %, every selection one 25 %, and
    no prompt is applied."""
    import modeldoctor.treatment.knowledge as knowledge
    from modeldoctor.data import KnowledgeProbe

    session = llama_session
    _make_a_bigram_model_answer_a(session)
    data = session.data(small_data_spec)
    count = 40
    selection, evaluation = (set(map(int, half)) for half in
                             split_probes(list(range(count)), seed=data.spec.seed))  # which index lands where
    known = set(sorted(evaluation)[:15]) | set(sorted(selection)[:5])
    probes = [KnowledgeProbe("test", f"Fact number {i} is", "A" if i in known else "B") for i in range(count)]
    monkeypatch.setattr(knowledge, "load_knowledge_probes", lambda: probes)
    correct, _ = score(session, probes, RunControl())  # the wiring works: exactly the "A" probes
    assert set(map(int, correct.nonzero()[0])) == known

    outcome = treat(session, TreatmentPlan(["recovery-prompts"], target="int3"), data).outcomes[0]
    assert outcome.details["evaluation_probes"] == outcome.details["selection_probes"] == 20
    assert outcome.details["accuracy"] == pytest.approx(
        {"original": 0.75, "compressed": 0.75, "best_prompt": 0.75, "per_input": 0.75})
    assert outcome.details["selection_accuracy"] == pytest.approx(
        {"compressed": 0.25, "best_prompt": 0.25, "per_input": 0.25})
    assert not outcome.applied and outcome.after["knowledge_accuracy"] == pytest.approx(0.75)
    assert len(outcome.table) >= 5 and all(row["held_out_accuracy"] == pytest.approx(0.75) for row in outcome.table)


def test_treatments_compose_and_cancel_rolls_the_run_back(llama_session, small_data_spec):
    session = llama_session
    data = session.data(small_data_spec)
    treat(session, TreatmentPlan(["prune-grad"], target="none"), data)
    after_first = session.weights_digest()
    choices = session.treatment.choices()
    control = RunControl()
    events = []
    for event in run_treatments(session, TreatmentPlan(["awq", "mixed-precision"], target="int4"), data, control):
        events.append(event)
        if isinstance(event, Progress) and event.done >= 5:
            control.cancel()
    assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
    assert session.weights_digest() == after_first
    assert session.treatment.choices() == choices


def test_progress_has_an_eta_and_every_treatment_reports(llama_session, small_data_spec):
    data = llama_session.data(small_data_spec)
    events = list(run_treatments(llama_session, TreatmentPlan(["mixed-precision", "calibrate-temperature"],
                                                              target="int8-dynamic"), data))
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1].done == progress[-1].total
    assert any(e.eta_s is not None and e.eta_s > 0 for e in progress[:-1])
    assert [e.outcome.name for e in events if isinstance(e, TreatmentResult)] == ["mixed-precision",
                                                                                   "calibrate-temperature"]


def test_long_stages_report_progress_as_they_go(llama_session, small_data_spec):
    """The scale search reports each layer group, and every stage is named when it starts (the app
    showed "smoothquant: before" for minutes while the search ran)."""
    data = llama_session.data(small_data_spec)
    events = list(run_treatments(llama_session, TreatmentPlan(["smoothquant"], target="int8-dynamic"), data))
    progress = [e for e in events if isinstance(e, Progress)]
    done = [e.done for e in progress]
    assert done == sorted(done) and progress[-1].done == progress[-1].total
    stages = [e.stage for e in progress]
    search = [s for s in stages if "searching scales" in s and "layer groups" in s]
    groups = int(search[-1].split(" of ")[1].split()[0])
    assert len(search) >= groups > 0, "one report per layer group"
    for stage in ("whole-model figures before", "searching scales", "checking the float model",
                  "whole-model figures after"):
        first = next(i for i, s in enumerate(stages) if stage in s)
        assert progress[first].done < progress[-1].total, f"'{stage}' is announced when it starts"


@pytest.mark.parametrize("plan, message", [
    (TreatmentPlan([]), "at least one"),
    (TreatmentPlan(["bleach"]), "Unknown treatment"),
    (TreatmentPlan(["smoothquant"], target="int4"), "SmoothQuant"),
    (TreatmentPlan(["awq"], target="int8-dynamic"), "AWQ"),
    (TreatmentPlan(["mixed-precision"], target="prune-wanda-50"), "quantization"),
    (TreatmentPlan(["mixed-precision"], budget=1.5), "budget"),
    (TreatmentPlan(["calibrate-temperature"], decoding="int4"), "decoding"),
])
def test_bad_plans_are_refused_with_a_message(plan, message):
    with pytest.raises(PlanError, match=message):
        plan.validate()


def test_every_treatment_is_listed_with_a_summary():
    names = {t.name for t in treatments()}
    assert names == {"smoothquant", "awq", "prune-grad", "calibrate-temperature", "mixed-precision",
                     "recovery-prompts"}
    assert all(t.title and t.summary for t in treatments())


def test_saved_treated_model_reopens_with_its_choices(llama_dir, small_data_spec, tmp_path):
    from modeldoctor.treatment.save import save_treated_model

    session = Session.open(llama_dir)
    data = session.data(small_data_spec)
    session.begin_weight_treatment()
    with torch.no_grad():
        session.anatomy.head.weight.mul_(1.6)
    session.weights_changed(function_preserving=False)
    treat(session, TreatmentPlan(["calibrate-temperature"], target="none"), data)
    source_files = {p.name: p.stat().st_mtime_ns for p in llama_dir.iterdir()}
    with pytest.raises(ModelDoctorError, match="untouched"):
        save_treated_model(session, llama_dir / "treated")
    folder = save_treated_model(session, tmp_path / "treated")
    assert {p.name: p.stat().st_mtime_ns for p in llama_dir.iterdir()} == source_files
    reopened = Session.open(folder)
    torch.testing.assert_close(logits_of(reopened, data), logits_of(session, data))
    assert reopened.treatment.temperature == pytest.approx(session.treatment.temperature)
    assert reopened.treatment.applied and reopened.treatment.applied[0]["inherited"]
    with pytest.raises(ModelDoctorError, match="already exists"):
        save_treated_model(session, folder)


def test_export_of_a_treated_model(llama_dir, small_data_spec, tmp_path):
    """Kept linears and the temperature reach the export; validation compares with the untreated model."""
    from dataclasses import replace

    from modeldoctor.export.pipeline import export_model

    session = Session.open(llama_dir)
    data = session.data(small_data_spec)
    treat(session, TreatmentPlan(["prune-grad", "calibrate-temperature"], target="none"), data)
    session.treatment.keep, session.treatment.keep_for = ["0.mlp.down_proj", "1.mlp.down_proj"], "int8-dynamic"
    events = list(export_model(session, session.data(replace(small_data_spec, knowledge=False)), tmp_path / "onnx",
                               "int8-dynamic", budget_kl=10.0, prompts=["Hello"]))
    result = events[-1].report
    assert events[-1].reason == "completed", events
    # In the file itself: the kept linears' treated (pruned) weights feed float MatMuls; the other
    # down projection's does not.
    floats = float_matmul_weights(tmp_path / "onnx" / "model.onnx")
    down = {name: linear_digest(session.anatomy.linear(name)) for name in ("0.mlp.down_proj", "1.mlp.down_proj",
                                                                        "2.mlp.down_proj")}
    assert down["0.mlp.down_proj"] in floats and down["1.mlp.down_proj"] in floats
    assert down["2.mlp.down_proj"] not in floats
    assert result.validation["kl_mean"] > 0.05  # pruned: far from the original, which is what it is compared with
    card = json.loads((tmp_path / "onnx" / "modeldoctor.json").read_text())
    assert [t["name"] for t in card["treatments_applied"]] == ["prune-grad", "calibrate-temperature"][
        :len(card["treatments_applied"])]
    assert card["treatments_applied"][0]["name"] == "prune-grad"
    # The temperature was fitted for the float treated model ("none"), not for the int8 file: it must
    # not be written into it (a temperature tunes only the format it was fitted for).
    config_path = tmp_path / "onnx" / "generation_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    assert "modeldoctor_calibrated_temperature" not in config
    if session.treatment.temperature != 1.0:
        assert any("temperature" in note for note in result.notes)


def test_cli_treat_writes_results_and_refuses_bad_input(llama_dir, tmp_path, capsys):
    from modeldoctor.cli import main

    out = tmp_path / "results"
    code = main(["treat", str(llama_dir), "--treatments", "mixed-precision,calibrate-temperature",
                 "--target", "int8-dynamic", "--tokens", "192", "--calibration-tokens", "128", "--out", str(out),
                 "--quiet", "--save-model", str(tmp_path / "treated")])
    assert code == 0
    saved = json.loads((out / "treatment.json").read_text())
    assert [o["name"] for o in saved["outcomes"]] == ["mixed-precision", "calibrate-temperature"]
    assert (tmp_path / "treated" / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "mean KL" in printed and "→" in printed
    assert main(["treat", str(llama_dir), "--treatments", "bleach", "--out", str(out)]) == 2
    assert "Unknown treatment" in capsys.readouterr().err
    assert main(["treat", str(llama_dir), "--out", str(out)]) == 2  # neither treatments nor a checkup
    assert main(["treatments"]) == 0
    assert "gradient-aware" in capsys.readouterr().out.lower()


def test_diagnosis_recommends_treatments_and_the_cli_takes_them(llama_dir, small_data_spec, tmp_path, capsys):
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.cli import main
    from modeldoctor.treatment.recommend import recommend

    session = Session.open(llama_dir)
    plan = CheckupPlan(modifications=["int8-dynamic", "int2", "prune-wanda-70", "decode-temp-1.5"], knowledge=False,
                       threshold=1e-4)
    report = checkup(session, plan, session.data(small_data_spec))
    advice = {r.treatments: r for r in recommend(report)}
    assert ("smoothquant", "mixed-precision") in advice and ("awq", "mixed-precision") in advice
    assert advice[("prune-grad",)].sparsity == 0.7 and advice[("prune-grad",)].target == "none"
    assert ("calibrate-temperature",) in advice
    assert all("→" in r.reason for r in advice.values())
    report.save(tmp_path / "checkup")
    code = main(["treat", str(llama_dir), "--from-checkup", str(tmp_path / "checkup"), "--tokens", "192",
                 "--calibration-tokens", "128", "--out", str(tmp_path / "treated"), "--quiet"])
    assert code == 0
    saved = json.loads((tmp_path / "treated" / "treatment.json").read_text())
    assert saved["plan"]["target"] == "int8-dynamic"  # the --target default picks the int8 recommendation
    assert [o["name"] for o in saved["outcomes"]] == ["smoothquant", "mixed-precision"]
    assert "→ int8-dynamic bleeds" in capsys.readouterr().err


def test_scale_search_ignores_padding_and_takes_batches_of_any_width(llama_session):
    """Calibration batches of different widths used to crash the scale search, and padded
    positions entered both the activation maxima and SmoothQuant's error."""
    from modeldoctor.data import DataSpec
    from modeldoctor.treatment.scaling import collect_inputs, find_scale_groups, smoothquant_scales, _weights

    data = llama_session.data(DataSpec(tokens=64, seq_len=32, calibration_tokens=86, selection_tokens=32,
                                       batch_size=2, knowledge=False))
    assert len({b.input_ids.shape[1] for b in data.calibration_batches}) > 1  # (2, 32) ... (1, 22)
    groups = find_scale_groups(llama_session, data.calibration_batches[0])
    inputs = collect_inputs(llama_session, groups, data)
    first = inputs[0]
    assert first.rows.shape[0] == data.calibration_tokens
    # Garbage in the padded positions changes nothing: they are never read.
    scales, alpha = smoothquant_scales(first, _weights(llama_session, groups[0]))
    first.x[~first.valid] = 1e4
    again, alpha_again = smoothquant_scales(first, _weights(llama_session, groups[0]))
    assert alpha == alpha_again and torch.equal(scales, again)
