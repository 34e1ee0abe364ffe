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

import torch

from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.model.anatomy import HEAD, gradients_only_for
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
    tokens = 0
    generator = torch.Generator(device=session.device).manual_seed(seed)
    for number, batch in enumerate(data.eval_batches):
        control.checkpoint()
        trace = ref.traces[number]
        grads, _ = _state_gradients(session, trace, batch.attention_mask, samples, generator)
        valid = batch.attention_mask.bool()
        for (name, target) in sums:
            control.checkpoint()
            with mods[name].applied(ctx, [target]), token_mask(ctx, batch.attention_mask), torch.inference_mode():
                if target == HEAD:
                    modified = session.replayer.head_logits(trace.states[-1])
                    kl = ref.logprobs[number].kl_to(torch.log_softmax(modified.float(), dim=-1))
                    sums[(name, target)] += float(kl[valid].sum())
                    continue
                block = anatomy.block_of(target)
                delta = session.replayer.run_block(trace, block, trace.states[block]).float() - trace.states[block + 1]
                inner = (grads[block + 1] * delta[None]).sum(-1)  # (samples, B, T)
                sums[(name, target)] += 0.5 * float(inner.square()[:, valid].sum()) / samples
        tokens += int(valid.sum())
        del grads
    return {key: value / max(tokens, 1) for key, value in sums.items()}


def _state_gradients(session, trace, mask: torch.Tensor, samples: int,
                     generator: torch.Generator) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """(∂ log p(y)/∂h for the residual stream entering each block j ≥ 1 and leaving the last
    (key N), (samples, B, T, H) per key in fp32; the labels y, (B, T, samples)). The labels are
    drawn per position from the unmodified model's own distribution, so the Fisher they give is
    the KL's Hessian. Backpropagated one block at a time from the reference trace (each block
    rerun with gradients from the state the trace recorded entering it), so memory holds one
    block's activations, not the whole model's: on a 1 B model a whole-model backward kept about
    half the model's size again."""
    anatomy, replayer = session.anatomy, session.replayer
    last = anatomy.num_blocks
    grads: dict[int, torch.Tensor] = {}
    with gradients_only_for(session.model), torch.enable_grad():
        # The head, a sequence at a time (its logits are the largest activations there are).
        rows, labels = [], []
        for row in range(trace.states[last].shape[0]):
            final = trace.states[last][row].clone().requires_grad_()
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
        grads[last] = torch.stack(rows, dim=1).float()
        for index in range(last - 1, 0, -1):
            entering = trace.states[index].clone().requires_grad_()
            out = replayer.run_block(trace, index, entering, track_grad=True)
            upstream = grads[index + 1]
            grads[index] = torch.stack([
                torch.autograd.grad(out, entering, grad_outputs=upstream[s].to(out.dtype),
                                    retain_graph=s + 1 < samples)[0] for s in range(samples)]).float()
            del out
    return grads, torch.stack(labels)
