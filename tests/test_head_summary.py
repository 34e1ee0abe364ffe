"""KL without the logits: a probe that leaves the head alone is scored from the state entering it
(summarise_head, RefLogProbs.kl_from_states), and must agree with the full distributions."""

import pytest
import torch
from conftest import FAMILIES

from modeldoctor.checkup.plan import CheckupPlan
from modeldoctor.checkup.replay import Replayer
from modeldoctor.checkup.run import measure
from modeldoctor.control import RunControl
from modeldoctor.metrics import attention as attention_metrics
from modeldoctor.metrics import divergence
from modeldoctor.metrics.divergence import DivergenceAccumulator, next_token_logprob, summarise_head
from modeldoctor.model.anatomy import stop_before
from modeldoctor.modifications.base import create
from modeldoctor.report.results import ProbeSpec
from modeldoctor.session import Session


@pytest.mark.parametrize("with_bias", [False, True])
def test_summarise_head_matches_the_full_log_softmax(monkeypatch, with_bias):
    monkeypatch.setattr(divergence, "HEAD_CHUNK_BYTES", 1)  # the smallest slices: 1000 rows in 4
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=generator)
    weight = torch.randn(1000, 16, generator=generator)
    weight[777] = hidden[0, 3] * 3  # one token far above the rest at one position, in a later slice
    bias = torch.randn(1000, generator=generator) if with_bias else None
    ids = torch.randint(0, 1000, (2, 9), generator=generator)
    summary = summarise_head(hidden, weight, bias, ids, mean_row=True)
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    torch.testing.assert_close((summary.best + summary.log_total).double(), torch.logsumexp(logits, -1),
                               rtol=0, atol=1e-5)
    assert torch.equal(summary.top, logits.argmax(-1)) and int(summary.top[0, 3]) == 777
    torch.testing.assert_close(summary.next_logprob().double(),
                               next_token_logprob(torch.log_softmax(logits, -1), ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(summary.mean_row.double(), torch.softmax(logits, -1) @ weight.double(),
                               rtol=1e-5, atol=1e-5)
    assert summarise_head(hidden, weight, bias, ids).mean_row is None  # only when asked for


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_from_states_agrees_with_the_full_distributions(model_dirs, small_data_spec, family):
    session = Session.open(model_dirs[family])
    data = session.data(small_data_spec)
    ref = session.current_reference(data)
    plain = session.replayer.plain_head()
    assert plain is not None and ref.logprobs[0].summary is not None
    trace, batch, reference = ref.traces[0], data.eval_batches[0], ref.logprobs[0]

    def both(start: int):
        final = session.replayer.run_from(trace, start, head=False).states[session.anatomy.num_blocks]
        head_input = session.replayer.head_input(final)
        summary = summarise_head(head_input, *plain, batch.input_ids)
        logits = session.replayer.head_logits(final)
        return reference.kl_from_states(head_input, summary), reference.kl_to(torch.log_softmax(logits, -1)), summary

    fast, _, summary = both(0)  # unchanged: exactly nothing, as the reference computed it the same way
    assert torch.equal(fast, torch.zeros_like(fast))
    assert torch.equal(summary.top, reference.summary.top)
    assert torch.equal(summary.next_logprob(), ref.next_logprob[0])
    mod = create("int2")
    with mod.applied(session.mod_context(data), ["1"]):
        fast, full, _ = both(1)
    assert float(full.mean()) > 1e-3  # a change the figures can see
    torch.testing.assert_close(fast, full, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("modification, target", [("int4", "1"), ("remove", "2"), ("int8-dynamic", "0.mlp.up_proj"),
                                                  ("int4", "head")])
def test_a_probe_reads_the_same_with_or_without_the_logits(llama_session, small_data_spec, monkeypatch,
                                                           modification, target):
    data = llama_session.data(small_data_spec)
    ref = llama_session.current_reference(data)
    plan = CheckupPlan(modifications=[modification], knowledge=False, attention=False)
    spec = ProbeSpec(0, modification, create(modification).family, "isolated", (target,),
                     llama_session.anatomy.block_of(target))
    calls = []
    real = DivergenceAccumulator.add_from_states
    monkeypatch.setattr(DivergenceAccumulator, "add_from_states",
                        lambda self, *args: calls.append(1) or real(self, *args))
    fast = measure(llama_session, ref, data, plan, spec, RunControl()).metrics
    assert bool(calls) == (target != "head")  # a probe of the head itself needs its logits
    monkeypatch.setattr(Replayer, "plain_head", lambda self: None)
    full = measure(llama_session, ref, data, plan, spec, RunControl()).metrics
    # Float32 rounding apart (a few 1e-6 nats per token: kl_from_states' two log-normalisers
    # come from different logits, the full KL's roundings cancel to first order).
    for name in ("kl_mean", "kl_p90", "kl_max", "delta_p_rms", "ppl"):
        assert fast[name] == pytest.approx(full[name], rel=1e-3, abs=5e-6), name
    assert fast["same_top"] == full["same_top"]


def test_a_hooked_head_is_not_plain(llama_session):
    assert llama_session.replayer.plain_head() is not None
    handle = llama_session.anatomy.head.register_forward_pre_hook(lambda module, args: None)
    try:
        assert llama_session.replayer.plain_head() is None  # an activation quantizer sees its input
    finally:
        handle.remove()


def test_attention_maps_take_one_pass_that_stops_before_the_head(llama_session):
    anatomy = llama_session.anatomy
    ids = torch.randint(3, 300, (1, 16))
    head_calls, attention_calls = [], []
    handles = [anatomy.head.register_forward_hook(lambda *args: head_calls.append(1)),
               anatomy.blocks[0].module.get_submodule(anatomy.blocks[0].attention_name).register_forward_hook(
                   lambda *args: attention_calls.append(1))]
    try:
        maps = attention_metrics.attention_maps(llama_session.model, anatomy, ids)
        assert sorted(maps) == [0, 1, 2] and maps[0].shape[-2:] == (16, 16)
        with create("remove").applied(llama_session.mod_context(), ["1"]):
            removed = attention_metrics.attention_maps(llama_session.model, anatomy, ids)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(removed) == [0, 2]  # the removed block has none, and is not asked again
    assert len(attention_calls) == 2 and not head_calls
    torch.testing.assert_close(removed[0], maps[0])


def test_the_reference_and_a_probe_work_where_autograd_is_on(llama_session, small_data_spec):
    # The app runs the engine on worker threads, where autograd is on unless the engine turns it off.
    data = llama_session.data(small_data_spec)
    with torch.enable_grad():
        ref = llama_session.current_reference(data)
        record = measure(llama_session, ref, data, CheckupPlan(modifications=["int4"], knowledge=False),
                         ProbeSpec(0, "int4", "quantize", "isolated", ("1",), 1), RunControl())
    assert ref.logprobs[0].summary is not None and record.metrics["kl_mean"] > 0


def test_a_bfloat16_model_reads_the_same_with_or_without_the_logits(llama_dir, small_data_spec, monkeypatch):
    # Its logits are rounded to bfloat16; the summary takes them in float32, so its two
    # log-normalisers do not carry rounding noise of their own size.
    session = Session.open(llama_dir, dtype="bfloat16")
    data = session.data(small_data_spec)
    ref = session.current_reference(data)
    plan = CheckupPlan(modifications=["int2"], knowledge=False, attention=False)
    spec = ProbeSpec(0, "int2", "quantize", "isolated", ("1",), 1)
    fast = measure(session, ref, data, plan, spec, RunControl()).metrics
    monkeypatch.setattr(Replayer, "plain_head", lambda self: None)
    full = measure(session, ref, data, plan, spec, RunControl()).metrics
    assert fast["kl_mean"] > 1e-3
    assert fast["kl_mean"] == pytest.approx(full["kl_mean"], rel=0.05)


def test_a_pass_cut_short_leaves_no_module_wrapped(llama_session):
    # Asked for attentions, transformers wraps the attention modules' forwards for the pass and
    # puts them back only if the pass ends normally.
    anatomy = llama_session.anatomy
    ids = torch.randint(3, 300, (1, 8))
    with attention_metrics.eager_attention(llama_session.model), torch.inference_mode():
        with stop_before(llama_session.model, anatomy.after_blocks):
            llama_session.model(input_ids=ids, output_attentions=True, use_cache=False)
    assert not [name for name, m in llama_session.model.named_modules() if "forward" in vars(m)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("modification", ["remove", "duplicate"])
def test_a_structural_probe_replays_its_attention_maps_from_its_block(model_dirs, small_data_spec, family,
                                                                      modification):
    from modeldoctor.checkup.run import _modified_attention, _reference_attention

    session = Session.open(model_dirs[family])
    data = session.data(small_data_spec)
    ref = session.current_reference(data)
    _reference_attention(session, ref, data)
    first_block_calls = []
    with create(modification).applied(session.mod_context(data), ["1"]):
        handle = session.anatomy.block_list[0].register_forward_pre_hook(lambda *a: first_block_calls.append(1))
        try:
            replayed = _modified_attention(session, ref, 1)
        finally:
            handle.remove()
        whole = attention_metrics.attention_maps(session.model, session.anatomy, ref.extras["attention_trace"].input_ids)
    assert sorted(replayed) == sorted(whole) and sorted(whole) == ([0, 2] if modification == "remove" else [0, 1, 2])
    for block in whole:
        torch.testing.assert_close(replayed[block], whole[block], rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole[2], ref.attention[2])  # the change reached the later blocks' maps
    assert not first_block_calls  # replayed from block 1: block 0's map is the reference's
