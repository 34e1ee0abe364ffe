import pytest
import torch

from conftest import FAMILIES
from modeldoctor.model.anatomy import weight_matrix
from modeldoctor.session import Session


@pytest.mark.parametrize("family", FAMILIES)
def test_anatomy_found_generically(model_dirs, family):
    session = Session.open(model_dirs[family])
    anatomy = session.anatomy
    assert anatomy.num_blocks == 3
    for part in anatomy.blocks:
        assert part.attention_out is not None and part.mlp_down is not None
        out = weight_matrix(part.linears[part.mlp_down])
        assert out.shape[0] == anatomy.hidden_size  # the down projection writes the residual stream
        assert weight_matrix(part.linears[part.attention_out]).shape[0] == anatomy.hidden_size
    assert len(anatomy.tail) == 1  # the final norm, found by run order
    assert "norm" in type(anatomy.tail[0]).__name__.lower()
    assert anatomy.head is session.model.get_output_embeddings()


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_from_every_block_matches_full_forward(model_dirs, family):
    session = Session.open(model_dirs[family])
    ids = torch.randint(3, 300, (2, 24))
    from modeldoctor.data import Batch

    trace, logits = session.replayer.trace(Batch(ids, torch.ones_like(ids)))
    for start in range(session.anatomy.num_blocks):
        replayed = session.replayer.run_from(trace, start).logits
        torch.testing.assert_close(replayed, logits, rtol=1e-5, atol=1e-5)


def _trace_and_verify(session):
    from modeldoctor.data import Batch

    ids = torch.randint(3, 300, (2, 24))
    trace, logits = session.replayer.trace(Batch(ids, torch.ones_like(ids)))
    session.replayer.verify(trace, logits)


def test_verify_refuses_a_model_that_works_between_blocks(model_dirs):
    from modeldoctor.errors import UnsupportedModelError

    session = Session.open(model_dirs["llama"])
    _trace_and_verify(session)  # a plain model passes
    # Doubling block 1's input stands for work the model's own loop does between blocks: a
    # replay from block 1's recorded input would double it again.
    handle = session.anatomy.block_list[1].register_forward_pre_hook(
        lambda module, args: (args[0] * 2, *args[1:]) if args else None)
    try:
        with pytest.raises(UnsupportedModelError, match="between its blocks"):
            _trace_and_verify(session)
    finally:
        handle.remove()


def test_verify_refuses_a_model_that_works_after_its_head(model_dirs):
    from modeldoctor.errors import UnsupportedModelError

    session = Session.open(model_dirs["llama"])
    # Soft-capping the logits in the model's forward, after the LM head, as Gemma 2 does.
    forward = session.model.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 3 * torch.tanh(out.logits / 3)
        return out

    session.model.forward = capped
    with pytest.raises(UnsupportedModelError, match="the LM head"):
        _trace_and_verify(session)


def test_a_thinned_trace_replays_from_every_block(model_dirs):
    from modeldoctor.data import Batch

    session = Session.open(model_dirs["llama"])
    ids = torch.randint(3, 300, (2, 24))
    trace, logits = session.replayer.trace(Batch(ids, torch.ones_like(ids)))
    thinned = trace.thinned(2)
    assert [s is None for s in thinned.states] == [False, True, False, False]  # blocks 0, 2 and the final state
    assert thinned.nbytes() == trace.nbytes() * 3 // 4
    for start in range(session.anatomy.num_blocks):
        run = session.replayer.run_from(thinned, start)
        assert min(run.states) == start - start % 2  # from the kept state at or below it
        torch.testing.assert_close(run.logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_block_rerun_from_its_memo_equals_a_full_rerun(model_dirs, family):
    """An estimate reruns a block once per changed linear, reusing what the change does not
    reach: the output must be the block's own, bit for bit, and the untouched attention of an
    MLP change must not run again."""
    import contextlib

    from modeldoctor.checkup.replay import BlockMemo
    from modeldoctor.data import Batch
    from modeldoctor.modifications.base import ModContext, create

    session = Session.open(model_dirs[family])
    ids = torch.randint(3, 300, (2, 24))
    trace, _ = session.replayer.trace(Batch(ids, torch.ones_like(ids)))
    memo = BlockMemo(session.replayer, trace, 1)
    mod, ctx = create("int3-g32"), ModContext(session.model, session.anatomy)
    part = session.anatomy.blocks[1]
    for relative in part.linears:
        name = f"1.{relative}"
        with mod.applied(ctx, [name]):
            expected = session.replayer.run_block(trace, 1, trace.states[1])
        assert not torch.equal(expected, trace.states[2])  # the change reaches the output
        assert torch.equal(memo.rerun(mod.applied(ctx, [name])), expected), name
    assert torch.equal(memo.rerun(contextlib.nullcontext()), trace.states[2])
    first_attention_linear = session.anatomy.linear(f"1.{next(iter(part.linears))}")
    calls = []
    handle = first_attention_linear.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        rerun = memo.rerun(mod.applied(ctx, [f"1.{part.mlp_down}"]))
        assert not calls  # the attention returned what it returned before, without running
        rerun_attention = memo.rerun(mod.applied(ctx, [f"1.{part.attention_out}"]))
        assert calls  # a change inside the attention runs it
    finally:
        handle.remove()
    assert not torch.equal(rerun, trace.states[2]) and not torch.equal(rerun_attention, trace.states[2])


def test_a_memo_is_not_corrupted_by_a_block_that_changes_outputs_in_place(model_dirs):
    """Falcon adds the attention into the MLP's output in place; a hook that does the same
    stands for it here. A rerun reusing the attention must see its output as it was, once."""
    import contextlib

    from modeldoctor.checkup.replay import BlockMemo
    from modeldoctor.data import Batch
    from modeldoctor.modifications.base import ModContext, create

    session = Session.open(model_dirs["llama"])
    part = session.anatomy.blocks[1]
    attention = session.anatomy.block_list[1].get_submodule(part.attention_out.rsplit(".", 1)[0])

    def add_in_place(module, args, output):
        (output[0] if isinstance(output, tuple) else output).add_(0.5)

    handle = attention.register_forward_hook(add_in_place)
    try:
        ids = torch.randint(3, 300, (2, 24))
        trace, _ = session.replayer.trace(Batch(ids, torch.ones_like(ids)))
        memo = BlockMemo(session.replayer, trace, 1)
        mod, ctx = create("int3-g32"), ModContext(session.model, session.anatomy)
        down = f"1.{part.mlp_down}"
        with mod.applied(ctx, [down]):
            expected = session.replayer.run_block(trace, 1, trace.states[1])
        for _ in range(2):  # and again: the record stays as it was
            assert torch.equal(memo.rerun(mod.applied(ctx, [down])), expected)
            assert torch.equal(memo.rerun(contextlib.nullcontext()), trace.states[2])
    finally:
        handle.remove()


def test_knowledge_states_are_thinned_only_as_far_as_memory_asks():
    from modeldoctor.session import knowledge_state_stride

    megabyte, budget = 1 << 20, 192 << 20
    assert knowledge_state_stride(30, int(5.2 * megabyte)) == 1  # the sample: 31 states, 0.16 GB
    assert knowledge_state_stride(22, int(18.6 * megabyte)) == 3  # a 1.1 B model: 9 of 23 states
    # Four blocks: five states at stride 1, three (blocks 0, 2 and the final one) at stride 2.
    assert knowledge_state_stride(4, budget // 5) == 1 and knowledge_state_stride(4, budget // 5 + 1) == 2
    assert knowledge_state_stride(7, budget // 5) == 2 and knowledge_state_stride(7, budget // 4) == 3
    assert knowledge_state_stride(7, budget // 4 + 1) == 4
    assert knowledge_state_stride(80, 40 * megabyte) == 4  # never fewer than every fourth block
