"""Per-token divergence statistics against stored reference log-probabilities.

The reference is always the full distribution, so KL is exact at any token budget: in memory
while tokens x vocabulary fits FULL_REFERENCE_BYTES, past it in a file on disk that the
operating system pages in as the probes read it (a top-k summary would only give a lower
bound, which read 35 % low on a flat 49k-token vocabulary).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modeldoctor.errors import ResourceError

FULL_REFERENCE_BYTES = 1 << 30


class ReferenceSpill:
    """A private folder for tensors kept on disk rather than in memory (reference probabilities
    past the memory budget, the untreated weights); removed when the object is collected or
    the program exits. The operating system pages the files in as they are read."""

    def __init__(self, prefix: str = "modeldoctor-reference-", what: str = "the exact reference") -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)
        self._count = 0
        self.what = what

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zero tensor of `shape` backed by a file in the folder."""
        count = math.prod(shape)
        size = count * torch.empty((), dtype=dtype).element_size()
        free = shutil.disk_usage(self.folder).free
        if size > free:
            raise ResourceError(
                f"Not enough disk space for {self.what}: {size / 2**30:.1f} GiB needed in "
                f"{self.folder.parent}, {free / 2**30:.1f} GiB free. Choose fewer evaluation tokens or free space.")
        self._count += 1
        path = self.folder / f"tensor-{self._count}.bin"
        return torch.from_file(str(path), shared=True, size=count, dtype=dtype).view(shape)

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        stored = self.tensor(tuple(tensor.shape), tensor.dtype)
        stored.copy_(tensor)
        return stored


def reference_fits_in_memory(tokens: int, vocab: int) -> bool:
    return tokens * vocab * 4 <= FULL_REFERENCE_BYTES


HEAD_CHUNK_BYTES = 8 << 20  # logits of one slice of the vocabulary at a time: they stay in cache


@dataclass
class HeadSummary:
    """What the divergence statistics need of a batch's logits, per token, taken without keeping
    the logits (summarise_head)."""

    best: torch.Tensor  # (B, T) the largest logit
    log_total: torch.Tensor  # (B, T) log sum_v exp(z_v - best): log q_v = z_v - best - log_total
    top: torch.Tensor  # (B, T) the most likely token
    next_logit: torch.Tensor  # (B, T-1) the logit of the token that actually comes next
    mean_row: torch.Tensor | None = None  # (B, T, H) sum_v q_v W_v, when asked for (a reference's)

    def next_logprob(self) -> torch.Tensor:
        """log q(actual next token) at positions 0..T-2: (B, T-1)."""
        return self.next_logit - self.best[:, :-1] - self.log_total[:, :-1]


@torch.inference_mode()  # also on a thread where autograd is on (the app's workers)
def summarise_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   input_ids: torch.Tensor, mean_row: bool = False) -> HeadSummary:
    """The HeadSummary of the logits hidden @ weight.T + bias of the whole batch (B, T, H),
    computed a slice of the vocabulary at a time with a running log-sum-exp: each slice's logits
    are used while they are still in cache, and no (B, T, V) tensor is ever made (on the sample,
    the head and the statistics take 0.36 s per 1024 tokens instead of 0.58 s a sequence at a
    time: benchmarks/head_statistics.py). Float32 throughout, whatever the model's dtype:
    bfloat16 logits would put rounding noise of their own size into kl_from_states. With `mean_row`, also the distribution's mean
    weight row, from the same logits. The same function on the same shapes gives the same
    rounding, so an unchanged model differs from its reference by exactly 0."""
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    rows = max(256, HEAD_CHUNK_BYTES // (4 * flat.shape[0]))
    best = total = top = weighted = None
    for start in range(0, weight.shape[0], rows):
        part = weight[start:start + rows].float()
        logits = torch.nn.functional.linear(flat, part, None if bias is None else bias[start:start + rows].float())
        slice_best, slice_top = logits.max(-1)
        new_best = slice_best if best is None else torch.maximum(best, slice_best)
        exps = logits.sub_(new_best[:, None]).exp_()
        if best is None:
            top, total = slice_top, exps.sum(-1)
            weighted = exps @ part if mean_row else None
        else:
            top = torch.where(slice_best > best, slice_top + start, top)
            rescale = (best - new_best).exp_()
            total = total.mul_(rescale).add_(exps.sum(-1))
            if mean_row:
                weighted = weighted.mul_(rescale[:, None]).add_(exps @ part)
        best = new_best
    shape = hidden.shape[:-1]
    following = input_ids[:, 1:]
    # A sequence at a time: the gathered weight rows are as large as the hidden states.
    next_logit = torch.stack([(hidden[row, :-1].float() * weight[following[row]].float()).sum(-1)
                              for row in range(hidden.shape[0])])
    if bias is not None:
        next_logit = next_logit + bias[following].float()
    return HeadSummary(best.view(shape), total.log().view(shape), top.view(shape), next_logit,
                       None if weighted is None else (weighted / total[:, None]).view(hidden.shape))


@dataclass
class RefLogProbs:
    """Reference probabilities of one batch (in memory or on disk), for exact KL."""

    full: torch.Tensor  # (B, T, V) float32 probabilities
    neg_entropy: torch.Tensor  # (B, T): sum p log p, so KL = neg_entropy - sum p log q
    argmax: torch.Tensor  # (B, T)
    # Where the head is a plain linear (Replayer.plain_head): the state entering it and its
    # HeadSummary with the mean weight row. A probe that leaves the head alone then gets KL
    # without the full distributions (kl_from_states).
    head_input: torch.Tensor | None = None  # (B, T, H), in the model's dtype
    summary: HeadSummary | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, spill: ReferenceSpill | None = None,
                    head_input: torch.Tensor | None = None, summary: HeadSummary | None = None) -> "RefLogProbs":
        """From logits (B, T, V) a sequence at a time, as the probes see theirs (Replayer.head_parts):
        the log-softmax's full-vocabulary temporaries over a whole batch would be several times the
        logits (0.5 GB on a 1 B model), and the same shapes give the same rounding, so an unchanged
        model differs from its reference by exactly 0. Other shapes at once. For a plain linear
        head, also what kl_from_states needs: the state entering the head and the HeadSummary
        (with its mean row) of these logits."""
        rows = [slice(row, row + 1) for row in range(logits.shape[0])] if logits.dim() == 3 else [slice(None)]
        full = (spill.tensor(tuple(logits.shape)) if spill is not None
                else torch.empty(logits.shape, dtype=torch.float32, device=logits.device))
        neg_entropy = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
        argmax = torch.empty(logits.shape[:-1], dtype=torch.long, device=logits.device)
        for part in rows:
            logp = torch.log_softmax(logits[part].float(), dim=-1)
            p = logp.exp()
            neg_entropy[part] = (p * logp).sum(-1)
            argmax[part] = logp.argmax(-1)
            full[part] = p
        return cls(full=full, neg_entropy=neg_entropy, argmax=argmax, head_input=head_input, summary=summary)

    def rows(self, rows: slice) -> "RefLogProbs":
        """The sequences `rows` of the batch (views, no copy)."""
        return RefLogProbs(self.full[rows], self.neg_entropy[rows], self.argmax[rows])

    def kl_to(self, logq: torch.Tensor) -> torch.Tensor:
        """KL(ref || mod) per token, in nats: (B, T), from the modified model's log-probs."""
        return (self.neg_entropy - (self.full * logq).sum(-1)).clamp(min=0)

    def kl_from_states(self, head_input: torch.Tensor, summary: HeadSummary) -> torch.Tensor:
        """KL(ref || mod) per token, (B, T), for a modified model whose state entering the same
        head is `head_input`: with log p_v = z_v - lse and z_v = h . W_v + b_v,
        KL = sum_v p_v (log p_v - log q_v) = (h_ref - h) . sum_v p_v W_v + (lse_mod - lse_ref).
        Differences are taken before sums (of the states; of the largest logits and of the
        log-totals apart), so small changes keep their precision."""
        reference = self.summary
        return (((self.head_input.float() - head_input.float()) * reference.mean_row).sum(-1)
                + (summary.best - reference.best) + (summary.log_total - reference.log_total)).clamp(min=0)


def next_token_logprob(logp: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(actual next token) at positions 0..T-2: (B, T-1), from log-probs (B, T, V)."""
    return logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)


# Token positions (how many tokens precede it in its sequence) in buckets growing 4× each:
# does the damage grow with the context a token sees?
POSITION_EDGES = (0, 64, 256, 1024, 4096, 16384)
POSITION_PREFIX = "kl_pos_"


def position_bucket_key(start: int) -> str:
    """The metric name of the bucket starting at `start`: kl_pos_0_63, …, kl_pos_16384_up."""
    index = POSITION_EDGES.index(start)
    end = POSITION_EDGES[index + 1] - 1 if index + 1 < len(POSITION_EDGES) else None
    return f"{POSITION_PREFIX}{start}_{end if end is not None else 'up'}"


def kl_by_position(kl: np.ndarray, positions: np.ndarray) -> dict[str, float]:
    """Mean KL of the tokens in each position bucket that has any."""
    out = {}
    for index, start in enumerate(POSITION_EDGES):
        end = POSITION_EDGES[index + 1] if index + 1 < len(POSITION_EDGES) else np.inf
        inside = (positions >= start) & (positions < end)
        if inside.any():
            out[position_bucket_key(start)] = float(kl[inside].mean())
    return out


def position_curve(metrics: dict[str, float]) -> list[tuple[str, int, float]]:
    """A probe's KL by position bucket as (label "64–255", bucket start, mean KL), in order."""
    curve = []
    for start in POSITION_EDGES:
        key = position_bucket_key(start)
        if metrics.get(key) is not None:
            rest = key[len(POSITION_PREFIX):].split("_")[1]
            curve.append((f"{start}–{rest}" if rest != "up" else f"{start}+", start, float(metrics[key])))
    return curve


@dataclass
class DivergenceAccumulator:
    """Collects per-token values over batches, then summarises them."""

    kl: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    nll_mod: list[np.ndarray] = field(default_factory=list)
    nll_ref: list[np.ndarray] = field(default_factory=list)
    delta_p: list[np.ndarray] = field(default_factory=list)

    def add(self, ref: RefLogProbs, ref_next_logprob: torch.Tensor, logits_mod: torch.Tensor,
            input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        logq = torch.log_softmax(logits_mod.float(), dim=-1)
        self._add(ref.kl_to(logq), logits_mod.argmax(-1) == ref.argmax, next_token_logprob(logq, input_ids),
                  ref_next_logprob, attention_mask)

    def add_from_states(self, ref: RefLogProbs, ref_next_logprob: torch.Tensor, head_input: torch.Tensor,
                        summary: HeadSummary, attention_mask: torch.Tensor) -> None:
        """Like add, for a modified model that left the reference's plain head alone: from the
        state entering the head and the HeadSummary of its logits (RefLogProbs.kl_from_states)."""
        self._add(ref.kl_from_states(head_input, summary), summary.top == ref.summary.top, summary.next_logprob(),
                  ref_next_logprob, attention_mask)

    def _add(self, kl: torch.Tensor, same_top: torch.Tensor, mod_next: torch.Tensor, ref_next_logprob: torch.Tensor,
             attention_mask: torch.Tensor) -> None:
        mask = attention_mask.bool()
        self.kl.append(kl[mask].cpu().numpy())
        # Right padding: a real token's position is how many real tokens precede it.
        self.positions.append((attention_mask.long().cumsum(-1) - 1)[mask].cpu().numpy())
        self.same_top.append(same_top[mask].cpu().numpy())
        next_mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
        self.nll_mod.append((-mod_next)[next_mask].cpu().numpy())
        self.nll_ref.append((-ref_next_logprob)[next_mask].cpu().numpy())
        self.delta_p.append((mod_next.exp() - ref_next_logprob.exp())[next_mask].cpu().numpy())

    def summary(self) -> dict[str, float]:
        kl = np.concatenate(self.kl).astype(np.float64)
        nll_mod = np.concatenate(self.nll_mod).astype(np.float64)
        nll_ref = np.concatenate(self.nll_ref).astype(np.float64)
        delta = np.concatenate(self.delta_p).astype(np.float64)
        figures = summarise(kl, np.concatenate(self.same_top), nll_mod, nll_ref, delta)
        figures.update(kl_by_position(kl, np.concatenate(self.positions)))
        return figures


def summarise(kl: np.ndarray, same_top: np.ndarray, nll_mod: np.ndarray, nll_ref: np.ndarray,
              delta_p: np.ndarray) -> dict[str, float]:
    n = len(kl)
    ppl = _exp(nll_mod.mean())
    ppl_ref = _exp(nll_ref.mean())
    return {
        "kl_mean": float(kl.mean()),
        "kl_stderr": float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "kl_median": float(np.median(kl)),
        "kl_p90": float(np.percentile(kl, 90)),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "same_top": float(np.mean(same_top)),
        "delta_p_rms": float(np.sqrt(np.mean(delta_p ** 2))),
        "ppl": ppl,
        "ppl_ref": ppl_ref,
        "ppl_ratio": ppl / ppl_ref if ppl_ref else float("inf"),
        "tokens": float(n),
    }


def _exp(x: float) -> float:
    return float(math.exp(min(x, 700.0)))


def knowledge_correct(logits: torch.Tensor, positions: list[list[int]], answers: list[list[int]]) -> list[bool]:
    """A probe is answered when every answer token is the model's top prediction."""
    top = logits.argmax(-1)
    return [bool(all(int(top[row, p]) == t for p, t in zip(pos, ans)))
            for row, (pos, ans) in enumerate(zip(positions, answers))]


def answer_positions_mask(batch_shape: tuple[int, int], positions: list[list[int]],
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (B, T) mask of the positions whose prediction a knowledge probe scores."""
    mask = torch.zeros(batch_shape, dtype=torch.bool, device=device)
    for row, pos in enumerate(positions):
        mask[row, pos] = True
    return mask


def knowledge_correct_sparse(logits: torch.Tensor, mask: torch.Tensor, positions: list[list[int]],
                             answers: list[list[int]]) -> list[bool]:
    """knowledge_correct for logits computed only at mask's positions (row-major order)."""
    top = logits.argmax(-1).tolist()
    results, cursor = [], 0
    for pos, ans in zip(positions, answers):
        ordered = sorted(zip(pos, ans))
        results.append(all(top[cursor + i] == t for i, (_, t) in enumerate(ordered)))
        cursor += len(ordered)
    return results
