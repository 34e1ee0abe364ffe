"""What a modification does to a mixture of experts' routing, beside the KL.

Hooks on each MoE block's router record which experts every real (non-padding) token is
sent to. Against the unmodified model on the same batches this gives, per probe:

- routing_flip_rate: the fraction of tokens whose set of experts (at the model's own k)
  changes in at least one MoE block (per block in the probe's `routing` record);
- the load per expert, original and modified (the fraction of tokens each expert receives,
  at the k the modified model actually uses), and load_shift: the largest total-variation
  distance between the two load distributions over the blocks.

The reference's load on the evaluation text is the expert usage the report shows (an expert
that gets no token is never used); drop-least-used fits on the calibration split instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from modeldoctor.model import Anatomy
from modeldoctor.modifications.base import temporary_hooks


def _routes_of(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(tokens, k) expert indices of the k largest router logits, sorted so sets compare as rows.
    Softmax keeps the order, so these are the experts the block's softmax-then-top-k picks."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return torch.topk(logits, min(k, logits.shape[-1]), dim=-1).indices.sort(dim=-1).values


def _real(mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The batch's padding mask flattened like the router's input (batch * sequence), or None
    when the router saw something else (then every row counts)."""
    if mask is None or mask.numel() != tokens:
        return None
    return mask.reshape(-1).bool()


def _load(used: torch.Tensor, experts: int) -> np.ndarray:
    """Tokens sent to each expert."""
    return torch.bincount(used.reshape(-1), minlength=experts).cpu().numpy().astype(np.float64)


@dataclass
class BlockRoutes:
    chosen: torch.Tensor  # (real tokens, k) at the model's own k: what flips compare
    load: np.ndarray  # tokens per expert at the k the block used


class RouteRecorder:
    """Records each MoE router call while active: block -> BlockRoutes of the batch running now
    (`take` hands them over and starts the next batch)."""

    def __init__(self, anatomy: Anatomy, top_k: dict[int, int]) -> None:
        self.anatomy = anatomy
        self.top_k = top_k  # the unmodified model's k per block: flips compare sets of this size
        self.mask: torch.Tensor | None = None
        self.active = True
        self._batch: dict[int, BlockRoutes] = {}

    def hook(self, block: int):
        moe = self.anatomy.blocks[block].moe

        def record(module, args, output):
            if not self.active:
                return None
            logits = output[0] if isinstance(output, tuple) else output
            logits = logits.detach().reshape(-1, logits.shape[-1])
            real = _real(self.mask, logits.shape[0])
            if real is not None:
                logits = logits[real]
            chosen = _routes_of(logits, self.top_k[block])
            used = chosen if moe.top_k == self.top_k[block] else _routes_of(logits, moe.top_k)
            self._batch[block] = BlockRoutes(chosen, _load(used, moe.num_experts))
            return None
        return record

    def take(self) -> dict[int, BlockRoutes]:
        batch, self._batch = self._batch, {}
        return batch


@contextlib.contextmanager
def recording(anatomy: Anatomy, top_k: dict[int, int] | None = None) -> Iterator[RouteRecorder]:
    """Record the routers' choices for the duration. Registered after a modification's own
    router hooks, it sees the logits as the modification left them."""
    top_k = top_k or {b.index: b.moe.top_k for b in anatomy.moe_blocks()}
    recorder = RouteRecorder(anatomy, top_k)
    with temporary_hooks() as hooks:
        for part in anatomy.moe_blocks():
            hooks.append(part.linears[part.moe.router].register_forward_hook(recorder.hook(part.index)))
        yield recorder


@dataclass
class ReferenceRouting:
    """The unmodified model's routes on the evaluation batches, and its expert usage there."""

    top_k: dict[int, int]
    batches: list[dict[int, BlockRoutes]]
    tokens: int  # real tokens over the batches
    load: dict[int, np.ndarray] = field(default_factory=dict)  # block -> tokens per expert

    def usage(self) -> dict[str, list[float]]:
        """Block -> the fraction of tokens each expert receives (sums to k)."""
        return {str(b): (load / max(self.tokens, 1)).tolist() for b, load in self.load.items()}


def reference_routing(session, ref, data) -> ReferenceRouting | None:
    """The reference's routes on the evaluation batches (computed once, kept with the reference);
    None for a model without MoE blocks. Each MoE block runs on the state the reference trace
    recorded entering it: what the unmodified block computes inside any probe's replay."""
    anatomy = session.anatomy
    if not anatomy.moe_blocks():
        return None
    if "routing" not in ref.extras:
        batches, tokens = [], 0
        load: dict[int, np.ndarray] = {}
        with recording(anatomy) as recorder, torch.inference_mode():
            for trace, batch in zip(ref.traces, data.eval_batches):
                recorder.mask = batch.attention_mask
                for part in anatomy.moe_blocks():
                    session.replayer.run_block(trace, part.index, trace.states[part.index])
                routes = recorder.take()
                batches.append(routes)
                tokens += int(batch.attention_mask.sum())
                for block, found in routes.items():
                    load[block] = load.get(block, 0) + found.load
            ref.extras["routing"] = ReferenceRouting(recorder.top_k, batches, tokens, load)
    return ref.extras["routing"]


def usage_on(session, batches, control=None) -> dict[int, np.ndarray]:
    """Tokens per expert of every MoE block, the model run whole on `batches`."""
    load: dict[int, np.ndarray] = {}
    with recording(session.anatomy) as recorder, torch.inference_mode():
        for batch in batches:
            if control is not None:
                control.checkpoint()
            recorder.mask = batch.attention_mask
            session.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            for block, found in recorder.take().items():
                load[block] = load.get(block, 0) + found.load
    return load


class RoutingComparison:
    """Accumulates one probe's routing against the reference, batch by batch."""

    def __init__(self, reference: ReferenceRouting, recorder: RouteRecorder) -> None:
        self.reference, self.recorder = reference, recorder
        self.blocks = sorted(reference.top_k)
        self.flipped_any = 0
        self.flipped = {b: 0 for b in self.blocks}
        self.load = {b: np.zeros_like(reference.load[b]) for b in self.blocks}

    def before(self, attention_mask: torch.Tensor) -> None:
        self.recorder.mask = attention_mask

    def add(self, number: int, start: int) -> None:
        """The batch `number` just replayed from block `start`: blocks before it routed as the
        reference; a later block whose router did not run (a removed block) routed no token."""
        ref_batch = self.reference.batches[number]
        ran = self.recorder.take()
        any_flip = None
        for block in self.blocks:
            if block < start:
                self.load[block] += ref_batch[block].load
                continue
            if block not in ran:
                chosen = ref_batch[block].chosen
                changed = torch.ones(chosen.shape[0], dtype=torch.bool, device=chosen.device)
            else:
                changed = (ran[block].chosen != ref_batch[block].chosen).any(dim=-1)
                self.load[block] += ran[block].load
            self.flipped[block] += int(changed.sum())
            any_flip = changed if any_flip is None else any_flip | changed
        if any_flip is not None:
            self.flipped_any += int(any_flip.sum())

    def finish(self) -> tuple[dict[str, float], dict[str, list]]:
        """The probe's routing metrics and its per-block record; stops recording (the knowledge
        replays that may follow are not part of it)."""
        self.recorder.active = False
        tokens = max(self.reference.tokens, 1)
        shifts = []
        for block in self.blocks:
            original, modified = self.reference.load[block], self.load[block]
            shifts.append(0.5 * float(np.abs(original / max(original.sum(), 1) - modified / max(modified.sum(), 1)).sum()))
        metrics = {"routing_flip_rate": self.flipped_any / tokens, "load_shift": max(shifts, default=0.0)}
        record = {
            "blocks": self.blocks,
            "flip_rate": [self.flipped[b] / tokens for b in self.blocks],
            "load_original": [(self.reference.load[b] / tokens).tolist() for b in self.blocks],
            "load_modified": [(self.load[b] / tokens).tolist() for b in self.blocks],
        }
        return metrics, record


@contextlib.contextmanager
def compared(anatomy: Anatomy, reference: ReferenceRouting | None) -> Iterator[RoutingComparison | None]:
    """A probe's routing against `reference` (from `reference_routing`, taken before the
    modification is applied), recorded while the modification is applied: enter this inside
    it. Yields None for a model without MoE blocks."""
    if reference is None:
        yield None
        return
    with recording(anatomy, reference.top_k) as recorder:
        yield RoutingComparison(reference, recorder)
