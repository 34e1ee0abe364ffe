"""Gradient-aware pruning scores each weight in its (out, in) orientation, also for GPT-2's
Conv1D, whose parameter is stored (in, out): a square Conv1D must not keep its gradient
transposed against the weight."""

import pytest
import torch

from modeldoctor.modifications.base import create
from modeldoctor.session import GRADIENT_CHUNK, Session


def independent_scores(session, data, linear: str, alpha: float) -> torch.Tensor:
    """|W|·(‖x‖ + α·Ĝ) in (out, in) orientation, computed here from first principles: a Conv1D
    computes y = x @ W_raw + b, so its (out, in) matrix is W_raw.T and so is its gradient."""
    module = session.anatomy.linear(linear)
    assert type(module).__name__ == "Conv1D"
    raw = module.weight
    assert raw.shape[0] == raw.shape[1], "the case under test is a square Conv1D"
    model = session.model

    squares = torch.zeros_like(raw)
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    raw.requires_grad_(True)
    try:
        for batch in data.calibration_batches:
            for row, mask in zip(batch.input_ids, batch.attention_mask):
                ids = row[mask.bool()]
                for start in range(0, len(ids) - 1, GRADIENT_CHUNK):
                    piece = ids[start:start + GRADIENT_CHUNK][None]
                    if piece.shape[1] < 2:
                        continue
                    with torch.enable_grad():
                        loss = model(input_ids=piece, labels=piece, use_cache=False).loss
                        (grad,) = torch.autograd.grad(loss, [raw])
                    squares += grad ** 2
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    grad_out_in = squares.sqrt().t()

    sums = torch.zeros(raw.shape[0])
    def record(_module, args):
        x = args[0].float()
        sums.add_((x[mask_now[0].bool()] ** 2).sum(0))
    mask_now = [None]
    handle = module.register_forward_pre_hook(record)
    try:
        with torch.inference_mode():
            for batch in data.calibration_batches:
                mask_now[0] = batch.attention_mask
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        handle.remove()
    x_norms = sums.sqrt()

    weight_out_in = raw.detach().t()
    scaled = grad_out_in / grad_out_in.mean() * x_norms.mean()
    return weight_out_in.abs() * (x_norms[None, :] + alpha * scaled)


@pytest.mark.parametrize("alpha", [1.0, 5.0])
def test_prune_grad_of_square_conv1d_prunes_lowest_scores(model_dirs, small_data_spec, alpha):
    session = Session.open(model_dirs["gpt2"])
    data = session.data(small_data_spec)
    linear = "1.attn.c_proj"
    scores = independent_scores(session, data, linear, alpha)

    mod = create(f"prune-grad-50-a{alpha:g}")
    ctx = session.mod_context(data, mod.needs_input_norms, need_gradients=mod.needs_gradients)
    module = session.anatomy.linear(linear)
    before = session.weights_digest()
    with mod.applied(ctx, [linear]):
        pruned = (module.weight.detach().t() == 0)
    assert session.weights_digest() == before

    count = round(0.5 * scores.shape[1])
    expected = torch.zeros_like(pruned)
    expected.scatter_(1, scores.argsort(dim=1, stable=True)[:, :count], True)
    assert int(pruned.sum()) == int(expected.sum())
    # Equal sets, allowing only swaps between scores equal to float precision at the cut.
    mismatched = pruned != expected
    if mismatched.any():
        rows = mismatched.any(1).nonzero().flatten()
        for r in rows:
            cut = scores[r].sort().values[count - 1:count + 1]
            assert torch.isclose(cut[0], cut[1], rtol=1e-5), f"row {int(r)} pruned the wrong weights"


def test_gradient_norms_are_stored_out_in(model_dirs, small_data_spec):
    """Every consumer sees one orientation: the gradient norms match weight_matrix's (out, in)."""
    from modeldoctor.model.anatomy import weight_matrix

    session = Session.open(model_dirs["gpt2"])
    norms = session.gradient_norms(session.data(small_data_spec))
    for name, value in norms.items():
        assert value.shape == weight_matrix(session.anatomy.linear(name)).shape, name
