"""Run a model from any block onward, reusing what the unmodified model computed before it.

One traced forward pass records, per block, the arguments the model passes to it (masks,
position embeddings, ...) and the hidden state entering it. Probing a modification in block
i then only reruns blocks i..N-1, the final norm and the head: the prefix cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from modeldoctor.data import Batch
from modeldoctor.errors import UnsupportedModelError
from modeldoctor.model import Anatomy
from modeldoctor.model.anatomy import stop_before


@dataclass
class BlockCall:
    args: tuple  # positional arguments after the hidden state
    kwargs: dict  # keyword arguments, without the hidden state
    hidden_as_kwarg: bool


@dataclass
class Trace:
    """What the unmodified model did on one batch."""

    calls: list[BlockCall]
    states: list[torch.Tensor | None]  # states[j]: hidden entering block j (None: thinned); states[N]: after the last
    input_ids: torch.Tensor | None = None  # the batch, to recompute the embedding when a probe changes it
    attention_mask: torch.Tensor | None = None
    handed_on: bool = True  # every block's output was, unchanged, the next block's input

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states if s is not None)

    def thinned(self, stride: int) -> "Trace":
        """This trace keeping the states entering every `stride`-th block (and the final one)
        only: a replay from another block starts at the kept one below it, a few blocks early."""
        last = len(self.states) - 1
        kept = [s if j % stride == 0 or j == last else None for j, s in enumerate(self.states)]
        return Trace(self.calls, kept, self.input_ids, self.attention_mask, self.handed_on)


def map_tensors(value, function):
    """`value` with function(tensor) for every tensor in it (containers rebuilt, other values as
    they are)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, function) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, function) for k, v in value.items()}
    return value


def first_output(output):
    """A module's main result: the first element when it returns a tuple (hidden states, then
    extras such as attention weights)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _trainable(value):
    """A copy of a recorded argument that autograd may save: inference-mode tensors cloned."""
    return map_tensors(value, lambda t: t.clone() if t.is_inference() else t)


def _copied(value):
    """`value` with every tensor in it copied."""
    return map_tensors(value, torch.Tensor.clone)


@dataclass
class Run:
    logits: torch.Tensor
    states: dict[int, torch.Tensor]  # block j -> hidden entering it (j >= start), N -> final


class Replayer:
    def __init__(self, model, anatomy: Anatomy) -> None:
        self.model = model
        self.anatomy = anatomy

    def trace(self, batch: Batch, logits: bool = True) -> tuple[Trace, torch.Tensor | None]:
        """Run the whole model once, recording each block's call; returns the trace and logits.
        Without `logits`, the pass stops after the last block (None for the logits): the caller
        takes the ones it needs from the final state."""
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

        outputs: list[torch.Tensor | None] = [None] * len(blocks)

        def post_hook(index):
            def hook(module, args, output):
                outputs[index] = first_output(output)
            return hook

        handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        handles += [b.register_forward_hook(post_hook(i)) for i, b in enumerate(blocks)]
        out = None
        stopper = contextlib.nullcontext() if logits else stop_before(self.model, self.anatomy.after_blocks)
        try:
            with torch.inference_mode(), stopper:
                out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        states[len(blocks)] = outputs[-1]
        if any(c is None for c in calls) or any(s is None for s in states):
            raise UnsupportedModelError("Not every block ran during a forward pass; the model cannot be probed.")
        # Replay feeds each block the previous one's output: work between blocks would be skipped.
        handed_on = all(outputs[j] is states[j + 1] or torch.equal(outputs[j], states[j + 1])
                        for j in range(len(blocks) - 1))
        return Trace(calls, states, batch.input_ids, batch.attention_mask, handed_on), out.logits if logits else None

    def embed(self, trace: Trace) -> torch.Tensor:
        """The state entering block 0 as the embedding is now (a probe may have changed its
        table): the model's own forward up to block 0, whatever it adds there (positions,
        scaling), stopped before any block runs."""
        captured: list[torch.Tensor] = []

        def hook(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        first = self.anatomy.block_list[0]
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode(), stop_before(self.model, first):  # registered after: runs after the capture
                self.model(input_ids=trace.input_ids, attention_mask=trace.attention_mask, use_cache=False)
        finally:
            handle.remove()
        if not captured:
            raise UnsupportedModelError("The first block did not run; the embedding cannot be recomputed.")
        return captured[0]

    def run_from(self, trace: Trace, start: int, hidden: torch.Tensor | None = None,
                 keep_states: bool = True, head_mask: torch.Tensor | None = None, head: bool = True) -> Run:
        """Run blocks start..N-1, the final norm and the head, as they are now (modified or not);
        from a thinned trace without `hidden`, from the nearest kept state at or below `start`.
        With head_mask (B, T), logits are computed only at those positions: (n, V). Without
        `head`, the logits are left to the caller (None), e.g. to take them a sequence at a time."""
        blocks = self.anatomy.block_list
        if hidden is None:
            while trace.states[start] is None:  # a thinned trace: from the kept state below
                start -= 1
        h = trace.states[start] if hidden is None else hidden
        states: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for j in range(start, len(blocks)):
                if keep_states:
                    states[j] = h
                h = self.run_block(trace, j, h)
            states[len(blocks)] = h
            logits = self.head_logits(h, head_mask) if head else None
        return Run(logits, states)

    def head_logits(self, final: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm and the head, as they are now, on the state leaving the last block."""
        final = self.head_input(final)
        with torch.inference_mode():
            return self.anatomy.head(final if head_mask is None else final[head_mask])

    def head_input(self, final: torch.Tensor) -> torch.Tensor:
        """The state entering the head: the final norm, as it is now, on the state leaving the
        last block (the whole batch, as the model runs it)."""
        with torch.inference_mode():
            for module in self.anatomy.tail:
                final = module(final)
        return final

    def plain_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of the head if it is a plain linear layer that nothing hooks, whose
        logits summarise_head can take a slice of the vocabulary at a time; else None."""
        head = self.anatomy.head
        if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks \
                or "forward" in vars(head):
            return None
        return head.weight, head.bias

    def head_parts(self, final: torch.Tensor):
        """(rows, logits of those rows) covering the batch of final states `final`: a sequence
        at a time (a batch's logits and their log-softmax were most of a probe's memory), unless
        something hooks the final norm or the head (an activation quantizer takes one range over
        the whole batch), then the whole batch at once, as it would be run."""
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (*self.anatomy.tail, self.anatomy.head))
        if hooked:
            yield slice(None), self.head_logits(final)
            return
        for row in range(final.shape[0]):
            yield slice(row, row + 1), self.head_logits(final[row:row + 1])

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
        return first_output(out)

    def verify(self, trace: Trace, full_logits: torch.Tensor) -> None:
        """Replaying must give the model's own logits, or probing is unsound. Checked without a
        second forward pass: no work between blocks (the trace saw each block's output handed on
        unchanged); the first block of every kind, the middle and the last block, rerun from the
        state the trace recorded entering them, give the state it recorded leaving them (within
        1e-3 of each token's norm); the final norm and the head on the last state give the logits."""
        blocks = self.anatomy.block_list
        last = len(blocks) - 1
        firsts = {}
        for index, block in enumerate(blocks):
            firsts.setdefault(type(block), index)
        checks = [(f"block {index}", self.run_block(trace, index, trace.states[index]), trace.states[index + 1])
                  for index in sorted(set(firsts.values()) | {last // 2, last})]
        checks.append(("the LM head", self.head_logits(trace.states[last + 1]), full_logits))
        for where, replayed, recorded in checks:
            # Relative to each token's own size: a few huge channels of the residual stream would
            # otherwise hide an error in the ordinary ones.
            difference = (replayed.float() - recorded.float()).norm(dim=-1)
            error = float((difference / recorded.float().norm(dim=-1).clamp(min=1e-6)).max())
            if error > 1e-3 or not trace.handed_on:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} does work that Model Doctor cannot reproduce block by block "
                    f"({'between its blocks' if not trace.handed_on else f'at {where}, difference {error:.3g}'}); "
                    "this architecture is not supported."
                )


class BlockMemo:
    """What the sub-modules of one block computed on one batch of the unmodified model, for
    rerunning the block with a few of its linears changed: a sub-module that the change left
    alone and that is called on the inputs it had then returns what it returned then, instead of
    running again. A probe of an MLP linear then skips the attention, one of a down projection
    everything but that linear and the MLP's element-wise work (on the sample, the estimate of
    all seven linears of a block about a quarter less work).

    Only modules holding parameters are remembered (those whose work is worth skipping). A
    module counts as changed when the change wrote one of its parameters (their `_version`s
    move) or hooked it, or when it contains such a module: changes of weights and hooks only
    (the estimate's quantizations); one that swaps a forward or an attribute is not seen, so
    the estimate uses the memo for weight modifications only. Inputs and outputs are kept as
    copies and handed out as copies, so a block that changes them in place afterwards cannot
    corrupt the record."""

    def __init__(self, replayer: "Replayer", trace: Trace, index: int) -> None:
        self.replayer, self.trace, self.index = replayer, trace, index
        block = replayer.anatomy.block_list[index]
        self.inside = [m for m in block.modules() if m is not block]
        self.modules = [m for m in self.inside if next(m.parameters(), None) is not None]
        self.calls: dict[torch.nn.Module, list[tuple[tuple, dict, object]]] = {m: [] for m in self.modules}

        # Each forward's own inputs and result (a module's hooks run around it, on every call), as
        # copies: a block may change them in place afterwards (Falcon adds the attention into the
        # MLP's output), which would otherwise corrupt the record.
        with _forwards_wrapped(self.modules, self._recording):
            replayer.run_block(trace, index, trace.states[index])

    def _recording(self, module: torch.nn.Module, forward):
        calls = self.calls[module]

        def recording(*args, **kwargs):
            inputs = (_copied(args), _copied(kwargs))
            output = forward(*args, **kwargs)
            calls.append((*inputs, _copied(output)))
            return output
        return recording

    def rerun(self, change: contextlib.AbstractContextManager) -> torch.Tensor:
        """The block's output on the trace's state entering it, with `change` (a context manager
        that modifies the model, e.g. a modification's `applied`) in force."""
        before = {m: _signature(m) for m in self.inside}
        with change:
            changed = {m for m in self.inside if _signature(m) != before[m]}
            kept = [m for m in self.modules if not any(inner in changed for inner in m.modules())]
            with _forwards_wrapped(kept, self._remembered):
                return self.replayer.run_block(self.trace, self.index, self.trace.states[self.index])

    def _remembered(self, module: torch.nn.Module, forward):
        calls, made = self.calls[module], [0]

        def remembered(*args, **kwargs):
            number = made[0]
            made[0] += 1
            if number < len(calls) and _same(args, calls[number][0]) and _same(kwargs, calls[number][1]):
                return _copied(calls[number][2])  # the caller may change it in place
            return forward(*args, **kwargs)
        return remembered


@contextlib.contextmanager
def _forwards_wrapped(modules: list[torch.nn.Module], wrap):
    """Inside, each module's forward is wrap(module, its forward); put back on exit."""
    own = {m: m.__dict__.get("forward") for m in modules}
    try:
        for module in modules:
            module.forward = wrap(module, module.forward)
        yield
    finally:
        for module, forward in own.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _signature(module: torch.nn.Module) -> tuple:
    return (tuple(p._version for p in module.parameters(recurse=False)), len(module._forward_hooks),
            len(module._forward_pre_hooks))


def _same(a, b) -> bool:
    """The same arguments: tensors identical or equal, containers alike, plain values equal; any
    other object only itself."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and (a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) in (int, float, bool, str) and type(a) is type(b) and a == b)
