"""The long-context probe: each modification of a plan, applied to the whole model, measured
against the original on one sequence of the evaluation text at increasing lengths, up to the
model's own length limit where the text is long enough; with the original's speed at each
length (attention's cost grows with it).

A RoPE scaling change is where this matters most: it is deployed to read past the limit, and
here it shows what it costs on lengths the model could already read.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.events import Event, Progress, Stage
from modeldoctor.metrics.divergence import (
    DivergenceAccumulator, RefLogProbs, ReferenceSpill, next_token_logprob, reference_fits_in_memory,
)
from modeldoctor.modifications.base import create, token_mask

DEFAULT_LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)
# Families a whole-model application says nothing about (every block removed, decoding settings).
WHOLE_MODEL_MEANINGLESS = ("decoding", "structure", "none")


def evaluation_stream(data: EvalData) -> torch.Tensor:
    """The evaluation split's real tokens, sequence after sequence, as one (1, N) stream."""
    pieces = [row[mask.bool()] for batch in data.eval_batches for row, mask in zip(batch.input_ids,
                                                                                    batch.attention_mask)]
    return torch.cat(pieces)[None]


def model_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def usable_lengths(wanted: tuple[int, ...], available: int, limit: int | None) -> list[int]:
    """The wanted lengths the text can fill, the limit's own length added where the text reaches
    it (a length past the limit is kept: a RoPE scaling change is meant for those), and the whole
    text where a longer length was wanted."""
    lengths = {n for n in wanted if 2 <= n <= available}
    if limit and limit <= available and (not lengths or limit > min(lengths)):
        lengths.add(limit)
    if any(n > available for n in wanted) and available >= 2:
        lengths.add(available)
    return sorted(lengths)


def whole_model_targets(session, mod) -> list[str] | None:
    """What a whole-model application of `mod` modifies: () for a change of the whole model,
    every block it applies to otherwise; None where a whole-model application means nothing
    (removing or duplicating every block, decoding settings)."""
    if mod.family in WHOLE_MODEL_MEANINGLESS:
        return None
    if mod.scopes == ("model",):
        return [] if mod.applies_to(session.anatomy, "model") else None
    return mod.blocks_it_applies_to(session.anatomy) or None


def run_context_sweep(session, data: EvalData, modifications: list[str], lengths: tuple[int, ...],
                      control: RunControl, result: dict) -> Iterator[Event]:
    """Fill `result` (the report's "context" section) while yielding progress: per length, the
    original's tokens per second, and per modification its mean KL (and by position bucket)."""
    stream = evaluation_stream(data)
    limit = model_limit(session.model)
    chosen = usable_lengths(lengths, stream.shape[1], limit)
    mods = [(name, create(name)) for name in modifications]
    mods = [(name, mod, whole_model_targets(session, mod)) for name, mod in mods]
    mods = [(name, mod, targets) for name, mod, targets in mods if targets is not None]
    result.update({"lengths": [], "tokens_per_s": [], "limit": limit, "available_tokens": int(stream.shape[1]),
                   "text": f"the evaluation split's sequences joined into one ({stream.shape[1]} tokens)",
                   "curves": {name: {"kl": [], "by_position": []} for name, _, _ in mods}})
    if not chosen or not mods:
        return
    yield Stage("context", f"{len(mods)} modifications on the whole model at {len(chosen)} lengths "
                           f"({', '.join(map(str, chosen))} tokens)")
    # A pass costs about its length in tokens (attention's share grows faster, which this ignores).
    total = sum(chosen) * (1 + len(mods))
    done, began = 0, control.clock()
    with torch.inference_mode():  # a first call pays one-off set-up costs: not the length's speed
        session.model(input_ids=stream[:, :chosen[0]], use_cache=False)
    # The original at every length first (its probabilities spilled to disk past the memory
    # budget), then each modification applied once for all lengths: applying one can cost more
    # than a pass (an SVD of every linear).
    spill = None
    references = []
    for length in chosen:
        ids = stream[:, :length]
        control.checkpoint()
        started = time.perf_counter()
        with torch.inference_mode():
            logits = session.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        seconds = time.perf_counter() - started
        if spill is None and not reference_fits_in_memory(sum(chosen), logits.shape[-1]):
            spill = ReferenceSpill(what="the long-context probe's reference")
        references.append((RefLogProbs.from_logits(logits, spill),
                           next_token_logprob(torch.log_softmax(logits.float(), -1), ids)))
        del logits
        result["lengths"].append(length)
        result["tokens_per_s"].append(length / seconds if seconds > 0 else float("inf"))
        done += length
        spent = control.clock() - began
        yield Progress(done, total, spent, spent / done * (total - done), stage="context")
    for name, mod, targets in mods:
        control.checkpoint()
        ctx = session.mod_context(data, mod.needs_input_norms, control, mod.needs_gradients)
        curve = result["curves"][name]
        with mod.applied(ctx, targets):
            for length, (reference, ref_next) in zip(chosen, references):
                control.checkpoint()
                ids = stream[:, :length]
                mask = torch.ones_like(ids)
                with token_mask(ctx, mask), torch.inference_mode():
                    modified = session.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                divergence = DivergenceAccumulator()
                divergence.add(reference, ref_next, modified, ids, mask)
                del modified
                figures = divergence.summary()
                curve["kl"].append(figures["kl_mean"])
                curve["by_position"].append({k: v for k, v in figures.items() if k.startswith("kl_pos_")})
                done += length
                spent = control.clock() - began
                yield Progress(done, total, spent, spent / done * (total - done), stage="context")
