"""Run a model from any block onward, reusing what the unmodified model computed before it.

One traced forward pass records, per block, the arguments the model passes to it (masks,
position embeddings, ...) and the hidden state entering it. Probing a modification in block
i then only reruns blocks i..N-1, the final norm and the head: the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modeldoctor.data import Batch
from modeldoctor.errors import UnsupportedModelError
from modeldoctor.model import Anatomy


@dataclass
class BlockCall:
    args: tuple  # positional arguments after the hidden state
    kwargs: dict  # keyword arguments, without the hidden state
    hidden_as_kwarg: bool


@dataclass
class Trace:
    """What the unmodified model did on one batch."""

    calls: list[BlockCall]
    states: list[torch.Tensor]  # states[j]: hidden entering block j; states[N]: after the last block
    input_ids: torch.Tensor | None = None  # the batch, to recompute the embedding when a probe changes it
    attention_mask: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)


def _trainable(value):
    """A copy of a recorded argument that autograd may save: inference-mode tensors cloned,
    containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_trainable(v) for v in value)
    if isinstance(value, dict):
        return {k: _trainable(v) for k, v in value.items()}
    return value


@dataclass
class Run:
    logits: torch.Tensor
    states: dict[int, torch.Tensor]  # block j -> hidden entering it (j >= start), N -> final


class Replayer:
    def __init__(self, model, anatomy: Anatomy) -> None:
        self.model = model
        self.anatomy = anatomy

    def trace(self, batch: Batch) -> tuple[Trace, torch.Tensor]:
        """Run the whole model once, recording each block's call; returns the trace and logits."""
        blocks = self.anatomy.block_list
        calls: list[BlockCall | None] = [None] * len(blocks)
        states: list[torch.Tensor | None] = [None] * (len(blocks) + 1)

        def pre_hook(index):
            def hook(module, args, kwargs):
                kwargs = dict(kwargs)
                if args:
                    hidden, rest, as_kwarg = args[0], args[1:], False
                else:
                    hidden, rest, as_kwarg = kwargs.pop("hidden_states"), (), True
                calls[index] = BlockCall(rest, kwargs, as_kwarg)
                states[index] = hidden
            return hook

        def last_hook(module, args, output):
            states[len(blocks)] = output[0] if isinstance(output, tuple) else output

        handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        handles.append(blocks[len(blocks) - 1].register_forward_hook(last_hook))
        try:
            with torch.inference_mode():
                out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if any(c is None for c in calls) or any(s is None for s in states):
            raise UnsupportedModelError("Not every block ran during a forward pass; the model cannot be probed.")
        return Trace(calls, states, batch.input_ids, batch.attention_mask), out.logits

    def embed(self, trace: Trace) -> torch.Tensor:
        """The state entering block 0 as the embedding is now (a probe may have changed its
        table): the model's own forward up to block 0, whatever it adds there (positions,
        scaling), stopped before any block runs."""
        captured: list[torch.Tensor] = []

        class _Reached(Exception):
            pass

        def hook(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Reached

        handle = self.anatomy.block_list[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                self.model(input_ids=trace.input_ids, attention_mask=trace.attention_mask, use_cache=False)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise UnsupportedModelError("The first block did not run; the embedding cannot be recomputed.")
        return captured[0]

    def run_from(self, trace: Trace, start: int, hidden: torch.Tensor | None = None,
                 keep_states: bool = True, head_mask: torch.Tensor | None = None) -> Run:
        """Run blocks start..N-1, the final norm and the head, as they are now (modified or not).
        With head_mask (B, T), logits are computed only at those positions: (n, V)."""
        blocks = self.anatomy.block_list
        h = trace.states[start] if hidden is None else hidden
        states: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for j in range(start, len(blocks)):
                if keep_states:
                    states[j] = h
                h = self.run_block(trace, j, h)
            states[len(blocks)] = h
            logits = self.head_logits(h, head_mask)
        return Run(logits, states)

    def head_logits(self, final: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm and the head, as they are now, on the state leaving the last block."""
        with torch.inference_mode():
            for module in self.anatomy.tail:
                final = module(final)
            return self.anatomy.head(final if head_mask is None else final[head_mask])

    def run_block(self, trace: Trace, index: int, hidden: torch.Tensor, track_grad: bool = False) -> torch.Tensor:
        """Block `index` as it is now, on `hidden`, called with the arguments the trace recorded.
        With `track_grad`, autograd records it (the recorded arguments are copied out of
        inference mode, whose tensors autograd may not save)."""
        block, call = self.anatomy.block_list[index], trace.calls[index]
        args, kwargs = (_trainable(call.args), _trainable(call.kwargs)) if track_grad else (call.args, call.kwargs)
        with torch.enable_grad() if track_grad else torch.inference_mode():
            if call.hidden_as_kwarg:
                out = block(*args, hidden_states=hidden, **kwargs)
            else:
                out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def verify(self, trace: Trace, full_logits: torch.Tensor) -> None:
        """Replaying from block 0 must give the model's own logits, or probing is unsound."""
        replayed = self.run_from(trace, 0, keep_states=False).logits
        scale = float(full_logits.abs().max()) or 1.0
        error = float((replayed - full_logits).abs().max())
        if error > 1e-3 * scale:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does work after its LM head that Model Doctor cannot "
                f"reproduce block by block (difference {error:.3g}); this architecture is not supported."
            )
