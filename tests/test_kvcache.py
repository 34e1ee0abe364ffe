import pytest
import torch

from conftest import FAMILIES
from modeldoctor.checkup.plan import CheckupPlan, build_probes
from modeldoctor.checkup.run import checkup
from modeldoctor.modifications.base import create
from modeldoctor.modifications.kvcache import quantize_per_token
from modeldoctor.session import Session


def test_per_token_quantization_is_symmetric_per_block_of_32_values():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 64)
    x[..., 3] = 10.0  # one loud value widens only its own block's scale
    q = quantize_per_token(x, 4)
    assert (q[..., 32:] - x[..., 32:]).abs().max() < (q[..., :32] - x[..., :32]).abs().max()
    for block in (q[0, 0, 0, :32], q[0, 0, 0, 32:]):
        scale = block.abs().max() / 7
        assert torch.allclose(block / scale, (block / scale).round(), atol=1e-4)  # on a 15-level grid


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["kv-int4", "k-int2", "v-int2", "kv-fp8", "kv-int3-channel"])
def test_kv_cache_probes_change_the_output_and_restore_it(model_dirs, small_data_spec, family, name):
    session = Session.open(model_dirs[family])
    ids = torch.arange(3, 80)[None]
    reference = session.model(input_ids=ids).logits
    with create(name).applied(session.mod_context(session.data(small_data_spec)), ["1"]):
        changed = session.model(input_ids=ids).logits
    assert not torch.equal(changed, reference), f"{name} changed nothing on {family}"
    torch.testing.assert_close(session.model(input_ids=ids).logits, reference, rtol=0, atol=0)
    assert all(getattr(c, "_attn_implementation", "sdpa") in ("sdpa", "eager")
               for c in (m.config for m in session.model.modules() if hasattr(m, "config")))


@pytest.mark.parametrize("name", ["kv-int4", "kv-fp8", "kv-int3-channel"])
def test_generation_through_the_cache_sees_what_one_prefill_sees(llama_session, small_data_spec, name):
    """The probe measures prefills; a cache filled token by token must give the same logits, or
    the figures would not be what generation meets."""
    from transformers import DynamicCache

    model = llama_session.model
    ids = torch.arange(3, 90)[None]
    with create(name).applied(llama_session.mod_context(llama_session.data(small_data_spec)), ["0", "1", "2"]):
        prefill = model(input_ids=ids).logits[0, 40:]
        cache = DynamicCache()
        steps = [model(input_ids=ids[:, :41], past_key_values=cache, use_cache=True).logits[0, -1]]
        for position in range(41, ids.shape[1]):
            steps.append(model(input_ids=ids[:, position:position + 1], past_key_values=cache,
                               use_cache=True).logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), prefill, rtol=1e-4, atol=1e-4)


def test_per_channel_scales_come_from_the_calibration_split(llama_session, small_data_spec):
    """One static scale per (head, channel): the calibration split's largest size, never the
    evaluation text's; a value past it saturates, as a runtime with calibrated scales does."""
    from modeldoctor.modifications.kvcache import quantize_with_scale

    data = llama_session.data(small_data_spec)
    ranges = llama_session.kv_ranges(data)
    attention = llama_session.model.model.layers[0].self_attn
    heads = llama_session.model.config.num_key_value_heads
    assert set(ranges) == {0, 1, 2} and ranges[0]["key"].shape == (heads, attention.head_dim)
    assert llama_session.kv_ranges(data) is ranges  # fitted once
    largest = torch.tensor([[1.0, 2.0]])
    x = torch.tensor([[[[0.6, 5.0], [-3.0, 1.0]]]])
    q = quantize_with_scale(x, 2, largest)  # levels -2..1 of scale 1 and 2
    assert q.tolist() == [[[[1.0, 2.0], [-2.0, 0.0]]]]
    with pytest.raises(Exception, match="calibration"):
        with create("kv-int4-channel").applied(llama_session.mod_context(), ["0"]):
            pass


def test_a_kv_cache_checkup_finds_fragile_blocks_and_measures_generation(llama_session, small_data_spec):
    plan = CheckupPlan(modifications=["k-int2", "v-int2", "kv-int8", "kv-int2"], modes=("isolated", "sweep"),
                       knowledge=False, scope="linears")
    probes, skipped = build_probes(plan, llama_session.anatomy)
    assert any("blocks only" in note for note in skipped)
    report = checkup(llama_session, plan, llama_session.data(small_data_spec))
    isolated = {(r.spec.modification, r.spec.targets[0]): r.score for r in report.by_mode("isolated")}
    assert all(isolated[("kv-int2", b)] > isolated[("kv-int8", b)] for b in "012")
    whole = [r for r in report.by_mode("sweep-model") if r.spec.modification == "kv-int2"][0]
    assert whole.metrics["kl_generation"] > 0 and whole.metrics["generation_tokens"] > 0
    assert "kv-int" in report.findings["sweeps"]
    from modeldoctor.checkup.diagnosis import diagnose

    split = next(f for f in diagnose(report) if f.title == "KV cache in int2: keys or values?")
    assert "Worst block" in split.text and "keys" in split.text


def test_kv_cache_probes_skip_state_space_blocks_and_say_why(tmp_path):
    from tiny_models import save_model

    session = Session.open(save_model("bamba", tmp_path / "bamba"))
    anatomy = session.anatomy
    attention = [str(b.index) for b in anatomy.blocks if b.kind == "attention"]
    mixers = [str(b.index) for b in anatomy.blocks if b.kind == "state-space"]
    assert attention and mixers
    probes, skipped = build_probes(CheckupPlan(modifications=["kv-int4"]), anatomy)
    assert sorted(p.targets[0] for p in probes) == sorted(attention)
    assert any("kv-int4 does not apply to the state-space (Mamba)" in n and "no attention" in n for n in skipped)
    ids = torch.arange(3, 60)[None]
    reference = session.model(input_ids=ids).logits
    with create("kv-int2").applied(session.mod_context(), attention):
        assert not torch.equal(session.model(input_ids=ids).logits, reference)
    torch.testing.assert_close(session.model(input_ids=ids).logits, reference, rtol=0, atol=0)
