"""Stage 1 of a two-stage checkup: estimate the KL of every (quantization, target) probe at
once, from the reference pass's traces and one backward pass per evaluation batch.

The estimates are figures the user sees (drawn as estimated), so like every figure they are on
the evaluation text; they fit nothing and choose nothing about the model, only the order in
which stage 2 measures probes exactly.

The change Δ a target makes is taken exactly at a point after which nothing mixes positions
before the block's output, and the rest of the model is taken to second order there, by the
Fisher of the output distribution, kept diagonal in the token position:

    KL ≈ ½ · Σ_t E_y[(g_t · Δ_t)²] / tokens,   g_t = ∂ log p(y) / ∂(the point's output at t),

with the labels y drawn from the unmodified model's own distribution, so that E_y[g gᵀ] is the
true Fisher (the KL's Hessian), not the empirical Fisher of the text's labels. The points:

- an MLP linear: its own output (Δ = the linear, changed, on the input it had; one matrix
  product);
- a linear of the token mixer (attention's query, key, value and output projections; a
  state-space mixer's): the mixer's output (Δ = the mixer rerun, changed, on its recorded
  input), so that attention mixing a value error into later positions is exact;
- a whole block, a linear in a mixture-of-experts block (an expert sees only the tokens routed
  to it) and any other linear: the block's output (the block rerun, changed, from the state the
  unmodified model fed it).

The gradients at all the points of a block come from the one backward pass through it that the
block-by-block backward makes anyway. The cross terms between positions in the later blocks
are what is left out, so the figures mostly run low (measured / estimated 0.55-3.6 on the
sample, median 1.2; value and output projections lowest); that is why they are estimates and the second stage measures the top of
the ranking exactly. The LM head has no later blocks: its KL is computed exactly.

Measured on the sample (benchmarks/estimate_points.py; all 211 linears of int8-dynamic,
int4-g32-asym and int3-g32 against exact probes): these points rank the linears as the block's
output for every linear does (Spearman 0.985, 0.973, 0.955 against 0.985, 0.973, 0.954) in
two thirds of the time (22.8 s against 34.1 s). Earlier, on 24 int3 linears: every linear's own
output (ModelOpt's auto_quantize point, value projections included) ranked them with Spearman
0.62 only, because it misses the attention mixing of value errors (underestimated 3-4x);
running two or three blocks before taking the expansion gained little (0.954, 0.958 against
0.945) for 1.5-2x the time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.memory import release_freed_memory
from modeldoctor.model.anatomy import HEAD, gradients_only_for, is_block_target
from modeldoctor.checkup.replay import BlockMemo, first_output, map_tensors
from modeldoctor.modifications.base import Modification, WeightModification, create, token_mask

LABEL_SAMPLES = 2  # labels drawn per position (one backward pass each)
ESTIMATOR = ("Fisher, diagonal in position: ½·Σₜ(∇ₜ log p(y)·Δₜ)² per token, Δ the exact change at an MLP "
             "linear's output, at the token mixer's output for the mixer's linears, else at the block's "
             "output; labels drawn from the model; the head's KL exact")


def estimable(mod: Modification) -> bool:
    """Quantizations, whose effect is small enough for a second-order estimate and needs no
    statistics of its own. Pruning is left exact: on the sample at block scope the estimate ranked
    Wanda-50 / magnitude-50 with Spearman 0.77 / 0.89 only, and every block sits above half the
    threshold, so nothing would be saved (benchmarks/results-estimate_pruning.txt). estimate_kl
    itself takes any weight change (input norms included), for that benchmark."""
    return (isinstance(mod, WeightModification) and mod.family == "quantize"
            and not mod.needs_input_norms and not mod.needs_gradients)


def estimate_kl(session, ref, data: EvalData, probes: dict[str, list[str]], control: RunControl | None = None,
                samples: int = LABEL_SAMPLES, seed: int = 0, local: bool = True) -> dict[tuple[str, str], float]:
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
    points = {block: _expansion_points(anatomy, block, [t for _, t in targets]) if local else {}
              for block, targets in by_block.items()}
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
        # Down from the last block, so that only the gradients of one block are held.
        for block, grads, taken in _block_gradients(session, trace, leaving_last, lowest, points):
            targets = by_block.get(block, [])
            here = points.get(block, {})
            at_point = [(n, t) for n, t in targets if here.get(t) in taken]
            whole = [(n, t) for n, t in targets if here.get(t) not in taken]
            for name, target in at_point:
                control.checkpoint()
                point = taken[here[target]]
                with mods[name].applied(ctx, [target]), token_mask(ctx, batch.attention_mask), torch.inference_mode():
                    change = first_output(point.module(*point.args, **point.kwargs)).float()
                    if _storages(change) & _storages((point.output, point.args, point.kwargs)):
                        change = change.clone()  # a module that hands back what it was given
                    change.sub_(point.output)  # in place, and a sample at a time below: the widest
                    for sample in range(samples):  # MLP outputs hold no more copies than they must
                        inner = (point.grads[sample] * change).sum(-1).reshape(valid.shape)
                        sums[(name, target)] += 0.5 * float(inner.square()[valid].sum()) / samples
                    point = change = inner = None
            # Several targets inside the block: each reruns only what its change reaches.
            memo = BlockMemo(session.replayer, trace, block) if len(whole) > 1 and any(
                not is_block_target(target) for _, target in whole) and all(
                isinstance(mods[name], WeightModification) for name, _ in whole) else None

            @contextlib.contextmanager
            def changed(name: str, target: str) -> Iterator[None]:
                with mods[name].applied(ctx, [target]), token_mask(ctx, batch.attention_mask):
                    yield

            for name, target in whole:
                control.checkpoint()
                with torch.inference_mode():
                    if memo is not None:
                        modified = memo.rerun(changed(name, target))
                    else:
                        with changed(name, target):
                            modified = session.replayer.run_block(trace, block, trace.states[block])
                    inner = (grads * (modified.float() - trace.states[block + 1])[None]).sum(-1)  # (samples, B, T)
                    sums[(name, target)] += 0.5 * float(inner.square()[:, valid].sum()) / samples
            del memo, taken
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


@dataclass
class _Point:
    """Where a linear's change is expanded: the module whose output it is taken at (the linear
    itself, or the token mixer holding it), its recorded call, and the gradients at its output."""

    module: torch.nn.Module
    args: tuple
    kwargs: dict
    output: torch.Tensor  # fp32: the module rerun unchanged, in inference mode
    grads: torch.Tensor  # (samples, *output.shape), bfloat16


def _expansion_points(anatomy, block: int, targets: list[str]) -> dict[str, str]:
    """target -> the block-relative name of the module at whose output its change is taken: for
    a linear of the token mixer (attention or state-space), the mixer, since it mixes a change
    into other positions; for an MLP linear, itself, since nothing between it and the block's
    output mixes positions. Other targets are left out and take the block's output: a whole
    block, a linear that is in neither (an unrecognised mixer's, say), and every linear of a
    mixture-of-experts block (an expert sees only the tokens routed to it)."""
    parts = anatomy.blocks[block] if block < anatomy.num_blocks else None
    if parts is None or parts.moe is not None:
        return {}
    points = {}
    for target in targets:
        if is_block_target(target):
            continue
        relative = target.split(".", 1)[1]
        mixer = next((m for m in (parts.attention_name, parts.mixer_name) if m and relative.startswith(m + ".")), None)
        if mixer:
            points[target] = mixer
        elif parts.mlp_name and relative.startswith(parts.mlp_name + "."):
            points[target] = relative
    return points


def _block_gradients(session, trace, leaving_last: torch.Tensor, lowest: int = 0,
                     points: dict[int, dict[str, str]] | None = None
                     ) -> Iterator[tuple[int, torch.Tensor, dict[str, _Point]]]:
    """(block j, the gradient with respect to the residual stream leaving block j, the expansion
    points inside block j that `points` names for it), from the last block down to block
    `lowest`, starting from `leaving_last` (_head_gradients). Backpropagated one block at a time
    from the reference trace (each block rerun with gradients from the state the trace recorded
    entering it), so memory holds one block's activations and gradients, not the whole model's
    (on a 1 B model a whole-model backward kept about half the model's size again). A point
    whose module ran other than once or not per token, whose inputs or output were changed in
    place after it ran, or whose output does not reach the block's, is left out (its targets take the block's
    output). The gradients at the points are copied into one tensor per point as the backward
    pass produces them, so they are never held twice."""
    grads, samples = leaving_last, leaving_last.shape[0]
    points = points or {}
    for index in range(session.anatomy.num_blocks - 1, lowest - 1, -1):
        names = sorted(set(points.get(index, {}).values()))
        if index == lowest and not names:
            yield index, grads, {}
            return
        block = session.anatomy.block_list[index]
        calls: dict[str, list] = {name: [] for name in names}
        inputs: dict[str, list] = {name: [] for name in names}

        def before(name):
            def hook(module, args, kwargs):
                inputs[name].append(_versions((args, kwargs)))
            return hook

        def after(name):
            def hook(module, args, kwargs, output):
                tensor = first_output(output)
                calls[name].append((module, args, kwargs, tensor, getattr(tensor, "_version", None)))
            return hook

        handles = []
        try:
            for name in names:
                module = block.get_submodule(name)
                handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
                handles.append(module.register_forward_hook(after(name), with_kwargs=True))
            with gradients_only_for(session.model), torch.enable_grad():
                entering = trace.states[index].clone().requires_grad_()
                out = session.replayer.run_block(trace, index, entering, track_grad=True)
        finally:
            for handle in handles:
                handle.remove()
        # A point is usable if its module ran once, per token (a module may run on the batch
        # flattened to (B·T, H)), and nothing changed its inputs or its output in place afterwards
        # (Falcon adds the attention into the MLP's output): its recorded call then replays what
        # the block computed.
        usable = [name for name in names if len(calls[name]) == 1 and isinstance(calls[name][0][3], torch.Tensor)
                  and calls[name][0][3].requires_grad and calls[name][0][3]._version == calls[name][0][4]
                  and calls[name][0][3].shape[:-1] == out.shape[:-1]
                  and _versions(calls[name][0][1:3]) == inputs[name][0]]
        outputs = [calls[name][0][3] for name in usable]
        following = torch.empty_like(grads)
        # bfloat16: rounding a gradient by 0.4 % moves an estimate that is good to a factor of two
        # by nothing that shows, and on a 1 B model these are the estimate's largest buffers
        at_points = [torch.empty((samples, *o.shape), dtype=torch.bfloat16, device=o.device) for o in outputs]
        reached = [0] * len(outputs)
        sample = 0

        def catcher(number):
            # copied out as the backward pass produces it, which then frees it: the points'
            # gradients are never all held twice
            def hook(gradient):
                if gradient is not None:  # None: no gradient flows here (then the point is not used)
                    at_points[number][sample] = gradient
                    reached[number] += 1
            return hook

        grad_hooks = [output.register_hook(catcher(number)) for number, output in enumerate(outputs)]
        try:
            with torch.enable_grad():
                for sample in range(samples):
                    following[sample] = torch.autograd.grad(out, entering, grad_outputs=grads[sample].to(out.dtype),
                                                            retain_graph=sample + 1 < samples)[0]
        finally:
            for handle in grad_hooks:
                handle.remove()
        unreached = {number for number, count in enumerate(reached) if count < samples}  # not on the way out
        del out, entering
        detached = lambda value: map_tensors(value, torch.Tensor.detach)  # noqa: E731
        taken = {}
        for number, name in enumerate(usable):
            if number in unreached:
                continue
            module, args, kwargs = calls[name][0][:3]
            args, kwargs = detached(args), detached(kwargs)
            # The unchanged output rerun as the changed one will be (inference mode; a kernel may
            # differ from the one that tracked gradients), so that no change reads exactly 0.
            with torch.inference_mode():
                unchanged = first_output(module(*args, **kwargs)).float()
            taken[name] = _Point(module, args, kwargs, unchanged, at_points[number])
        del calls, outputs, at_points
        yield index, grads, taken
        del taken
        grads = following


def _storages(value) -> set[int]:
    """Where the tensors in `value` keep their data."""
    found: set[int] = set()
    map_tensors(value, lambda t: found.add(t.untyped_storage().data_ptr()))
    return found


def _versions(value) -> list[int]:
    """The version counters of the tensors in `value` (they move when a tensor is changed in place)."""
    found: list[int] = []
    map_tensors(value, lambda t: found.append(t._version))
    return found
