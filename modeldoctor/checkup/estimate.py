"""Stage 1 of a two-stage checkup: estimate the KL of every (quantization, target) probe at
once, from the reference pass's traces and one backward pass per evaluation batch.

The estimates are figures the user sees (drawn as estimated), so like every figure they are on
the evaluation text; they fit nothing and choose nothing about the model, only the order in
which stage 2 measures probes exactly.

For a target in block i, the block is run once with the modification applied (from the
states the unmodified model fed it), which gives Δh, the change of the residual stream
leaving the block, exactly: attention mixing a value error into later positions and any
non-linearity inside the block included. The rest of the model is then taken to second order,
by the Fisher of the output distribution, kept diagonal in the token position:

    KL ≈ ½ · Σ_t E_y[(g_t · Δh_t)²] / tokens,   g_t = ∂ log p(y) / ∂h_t,

with the labels y drawn from the unmodified model's own distribution, so that E_y[g gᵀ] is the
true Fisher (the KL's Hessian), not the empirical Fisher of the text's labels. The cross terms
between positions in the later blocks are what is left out, so the figures run low (by
1.0-2.1x on the sample); that is why they are estimates and the second stage measures the top
of the ranking exactly. The LM head has no later blocks: its KL is computed exactly.

Measured on the sample (int3-g32, 24 linears, against exact probes): the same formula taken at
each linear's own output (ModelOpt's auto_quantize point) ranked them with Spearman 0.62,
because it misses the attention mixing of v_proj errors (underestimated 3-4x); at the block
output, as here, 0.945; running two or three blocks before taking the expansion gained
little (0.954, 0.958) for 1.5-2x the time. benchmarks/fast_checkup.py has the figures over all
linears.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.memory import release_freed_memory
from modeldoctor.model.anatomy import HEAD, gradients_only_for, is_block_target
from modeldoctor.checkup.replay import BlockMemo
from modeldoctor.modifications.base import Modification, WeightModification, create, token_mask

LABEL_SAMPLES = 2  # labels drawn per position (one backward pass each)
ESTIMATOR = ("block-output Fisher: ½·Σₜ(∇ₜ log p(y)·Δhₜ)² per token, Δh the modified block's exact "
             "change, labels drawn from the model; the head's KL exact")


def estimable(mod: Modification) -> bool:
    """Quantizations, whose effect is small enough for a second-order estimate and needs no
    statistics of its own. Pruning is left exact: on the sample at block scope the estimate ranked
    Wanda-50 / magnitude-50 with Spearman 0.77 / 0.89 only, and every block sits above half the
    threshold, so nothing would be saved (benchmarks/results-estimate_pruning.txt). estimate_kl
    itself takes any weight change (input norms included), for that benchmark."""
    return (isinstance(mod, WeightModification) and mod.family == "quantize"
            and not mod.needs_input_norms and not mod.needs_gradients)


def estimate_kl(session, ref, data: EvalData, probes: dict[str, list[str]], control: RunControl | None = None,
                samples: int = LABEL_SAMPLES, seed: int = 0) -> dict[tuple[str, str], float]:
    """Estimated mean KL (nats per token) of each (modification, target) in `probes`
    (modification -> block indices or linear names) on the evaluation batches of `data`,
    replaying the reference `ref`'s traces of them."""
    control = control or RunControl()
    anatomy = session.anatomy
    mods = {name: create(name) for name in probes}
    ctx = session.mod_context(data, any(m.needs_input_norms for m in mods.values()), control)
    sums = {(name, target): 0.0 for name, targets in probes.items() for target in targets}
    by_block: dict[int, list[tuple[str, str]]] = {}
    for name, target in sums:
        by_block.setdefault(anatomy.block_of(target), []).append((name, target))
    lowest = min(by_block, default=anatomy.num_blocks)  # the lowest block with a target (N: the head only)
    tokens = 0
    generator = torch.Generator(device=session.device).manual_seed(seed)
    for number, batch in enumerate(data.eval_batches):
        control.checkpoint()
        trace = ref.traces[number]
        valid = batch.attention_mask.bool()
        for name, target in by_block.get(anatomy.num_blocks, []):  # the head: its KL exactly
            control.checkpoint()
            with mods[name].applied(ctx, [target]), token_mask(ctx, batch.attention_mask), torch.inference_mode():
                for rows, modified in session.replayer.head_parts(trace.states[-1]):
                    kl = ref.logprobs[number].rows(rows).kl_to(torch.log_softmax(modified.float(), dim=-1))
                    sums[(name, target)] += float(kl[valid[rows]].sum())
        if lowest == anatomy.num_blocks:
            tokens += int(valid.sum())
            continue
        leaving_last, _ = _head_gradients(session, trace, batch.attention_mask, samples, generator)
        # Down from the last block, so that only the gradient at one block boundary is held.
        for block, grads in _block_gradients(session, trace, leaving_last, lowest):
            targets = by_block.get(block, [])
            # Several targets inside the block: each reruns only what its change reaches.
            memo = BlockMemo(session.replayer, trace, block) if len(targets) > 1 and any(
                not is_block_target(target) for _, target in targets) and all(
                isinstance(mods[name], WeightModification) for name, _ in targets) else None

            @contextlib.contextmanager
            def changed(name: str, target: str) -> Iterator[None]:
                with mods[name].applied(ctx, [target]), token_mask(ctx, batch.attention_mask):
                    yield

            for name, target in targets:
                control.checkpoint()
                with torch.inference_mode():
                    if memo is not None:
                        modified = memo.rerun(changed(name, target))
                    else:
                        with changed(name, target):
                            modified = session.replayer.run_block(trace, block, trace.states[block])
                    inner = (grads * (modified.float() - trace.states[block + 1])[None]).sum(-1)  # (samples, B, T)
                    sums[(name, target)] += 0.5 * float(inner.square()[:, valid].sum()) / samples
            del memo
            release_freed_memory()
        tokens += int(valid.sum())
    return {key: value / max(tokens, 1) for key, value in sums.items()}


def _head_gradients(session, trace, mask: torch.Tensor, samples: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂ log p(y)/∂h for the residual stream leaving the last block, (samples, B, T, H) in
    fp32; the labels y, (B, T, samples)). The labels are drawn per position from the unmodified
    model's own distribution, so the Fisher they give is the KL's Hessian. A sequence at a time:
    its logits are the largest activations there are."""
    anatomy = session.anatomy
    final_states = trace.states[anatomy.num_blocks]
    rows, labels = [], []
    with gradients_only_for(session.model), torch.enable_grad():
        for row in range(final_states.shape[0]):
            final = final_states[row].clone().requires_grad_()
            hidden = final
            for module in anatomy.tail:
                hidden = module(hidden)
            logp = torch.log_softmax(anatomy.head(hidden).float(), dim=-1)
            drawn = torch.multinomial(logp.detach().exp(), samples, replacement=True, generator=generator)
            picked = logp.gather(-1, drawn) * mask[row, :, None]  # (T, samples)
            rows.append(torch.stack([torch.autograd.grad(picked[:, s].sum(), final, retain_graph=s + 1 < samples)[0]
                                     for s in range(samples)]))
            labels.append(drawn)
            del logp, picked
    return torch.stack(rows, dim=1).float(), torch.stack(labels)


def _block_gradients(session, trace, leaving_last: torch.Tensor,
                     lowest: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """(block j, the gradient with respect to the residual stream leaving block j), from the last
    block down to block `lowest`, starting from `leaving_last` (_head_gradients). Backpropagated
    one block at a time from the reference trace (each block rerun with gradients from the state
    the trace recorded entering it), so memory holds one block's activations and one boundary's
    gradient, not the whole model's (on a 1 B model a whole-model backward kept about half the
    model's size again)."""
    grads, samples = leaving_last, leaving_last.shape[0]
    for index in range(session.anatomy.num_blocks - 1, lowest - 1, -1):
        yield index, grads  # leaving block index = entering block index + 1
        if index == lowest:
            return
        with gradients_only_for(session.model), torch.enable_grad():
            entering = trace.states[index].clone().requires_grad_()
            out = session.replayer.run_block(trace, index, entering, track_grad=True)
            grads = torch.stack([
                torch.autograd.grad(out, entering, grad_outputs=grads[s].to(out.dtype),
                                    retain_graph=s + 1 < samples)[0] for s in range(samples)]).float()
            del out, entering
