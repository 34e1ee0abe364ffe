"""A session: one loaded model with everything computed about it so far.

Passed explicitly to every engine call (no globals). It caches the reference pass and
calibration statistics per evaluation data, so redoing a step costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from modeldoctor.checkup.replay import Replayer, Trace
from modeldoctor.control import RunControl
from modeldoctor.memory import release_freed_memory
from modeldoctor.data import DataSpec, EvalData
from modeldoctor.data.sources import build_data
from modeldoctor.metrics.divergence import (
    ReferenceSpill, RefLogProbs, answer_positions_mask, knowledge_correct_sparse, next_token_logprob,
    reference_fits_in_memory, summarise_head,
)
from modeldoctor.model import find_anatomy, load_model
from modeldoctor.model.anatomy import gradients_only_for, stop_before
from modeldoctor.model.loading import LoadedModel
from modeldoctor.model.summary import summarize
from modeldoctor.modifications.base import ModContext
from modeldoctor.treatment.save import read_treatment_card
from modeldoctor.treatment.state import TreatmentState


class _Snapshot(dict):
    """Parameter name -> saved tensor, holding on to the folder its tensors live in."""

    spill = None


GRADIENT_CHUNK = 64  # tokens per gradient sample for gradient-aware pruning


# The knowledge probes are scored on a few probes only (the worst ones), and their text is about
# twice the evaluation text: their states are kept at every block while that takes at most this
# much memory (the sample: 0.16 GB), else at every second or third block, whichever fits (a 1.1 B
# model: every third), and at every fourth at the least; a scoring replays up to stride - 1
# blocks more.
KNOWLEDGE_STATE_BYTES = 192 << 20
KNOWLEDGE_STATE_STRIDE_MAX = 4


def knowledge_state_stride(blocks: int, bytes_per_state: int) -> int:
    """The smallest stride (at most KNOWLEDGE_STATE_STRIDE_MAX) whose kept states, every
    stride-th block's and the final one, fit KNOWLEDGE_STATE_BYTES."""
    for stride in range(1, KNOWLEDGE_STATE_STRIDE_MAX):
        if (-(-blocks // stride) + 1) * bytes_per_state <= KNOWLEDGE_STATE_BYTES:
            return stride
    return KNOWLEDGE_STATE_STRIDE_MAX


@dataclass
class Reference:
    """The unmodified model on the evaluation data: traces for replay, and its outputs."""

    traces: list[Trace]
    logprobs: list[RefLogProbs]
    next_logprob: list[torch.Tensor]
    knowledge_traces: list[Trace]
    knowledge_hits: list[bool]
    figures: dict[str, float]
    attention: dict | None = None  # block -> attention map, computed on first need
    continuations: list | None = None  # greedy continuations, computed on first need
    extras: dict = field(default_factory=dict)


class Session:
    def __init__(self, loaded: LoadedModel) -> None:
        torch.set_grad_enabled(False)  # this thread only; mitigations re-enable it locally
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.anatomy = find_anatomy(self.model)
        self.replayer = Replayer(self.model, self.anatomy)
        self.summary = summarize(loaded, self.anatomy)
        self._data: dict[DataSpec, EvalData] = {}
        self._references: dict[DataSpec, Reference] = {}  # of the untreated weights
        self._current_references: dict[tuple[DataSpec, int], Reference] = {}  # of treated weights
        self._input_norms: dict[DataSpec, dict[str, torch.Tensor]] = {}
        self._grad_norms: dict[DataSpec, dict[str, torch.Tensor]] = {}
        self._kv_ranges: dict[DataSpec, dict] = {}
        self._expert_usage: dict = {}
        self.weights_version = 0  # bumped whenever a treatment changes the weights
        self.onnx_graph_bytes: int | None = None  # what the last export's fp32 file held beyond its weights
        self.treatment = TreatmentState()
        card = read_treatment_card(loaded.path) if Path(loaded.path).is_dir() else None
        if card:  # a treated model saved earlier: its fp32 list and temperature still apply
            self.treatment.inherit(card)

    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False, dtype: str = "auto",
             device: str = "auto") -> "Session":
        return cls(load_model(path, allow_pickle=allow_pickle, dtype=dtype, device=device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- data and reference --------------------------------------------------------------
    def data(self, spec: DataSpec) -> EvalData:
        if spec not in self._data:
            data = build_data(self.model, self.tokenizer, spec)
            if self.device.type != "cpu":  # token ids and masks live where the model runs
                for batch in data.eval_batches + data.calibration_batches + data.selection_batches \
                        + data.knowledge_batches:
                    batch.input_ids = batch.input_ids.to(self.device)
                    batch.attention_mask = batch.attention_mask.to(self.device)
            self._data[spec] = data
        return self._data[spec]

    def reference(self, data: EvalData, control: RunControl | None = None,
                  on_batch: Callable[[int, int], None] | None = None) -> Reference:
        """The untreated model on `data`: what treatments and exports are measured against."""
        if data.spec not in self._references:
            with self.original_weights():
                self._references[data.spec] = self._compute_reference(data, control or RunControl(), on_batch)
        return self._references[data.spec]

    def current_reference(self, data: EvalData, control: RunControl | None = None,
                          on_batch: Callable[[int, int], None] | None = None) -> Reference:
        """The model as it is now (treated or not) on `data`: what a checkup probes against.
        Its traces feed the prefix cache, so they must come from the weights being probed: a
        treatment that changes the weights makes a new one (keyed by `weights_version`)."""
        if self.treatment.original is None:
            return self.reference(data, control, on_batch)
        key = (data.spec, self.weights_version)
        if key not in self._current_references:
            self._current_references.clear()  # older weights' references are never read again
            self._current_references[key] = self._compute_reference(data, control or RunControl(), on_batch)
        return self._current_references[key]

    def _compute_reference(self, data: EvalData, control: RunControl,
                           on_batch: Callable[[int, int], None] | None) -> Reference:
        vocab = int(self.anatomy.head.weight.shape[0])
        # Past the memory budget the probabilities go to disk: KL stays exact at any budget.
        spill = None if reference_fits_in_memory(data.eval_tokens, vocab) else ReferenceSpill()
        traces, logprobs, next_lp = [], [], []
        nll_sum, nll_count = 0.0, 0
        total = len(data.eval_batches) + len(data.knowledge_batches)
        for number, batch in enumerate(data.eval_batches):
            control.checkpoint()
            trace, logits = self.replayer.trace(batch, logits=number == 0)  # the model's own, to verify once
            if number == 0:
                self.replayer.verify(trace, logits)
            del logits
            # The head again, as the probes run it (Replayer.head_parts): the same shapes give the
            # same rounding, so an unchanged model differs from its reference by exactly 0.
            logits = torch.cat([part for _, part in self.replayer.head_parts(trace.states[-1])])
            traces.append(trace)
            plain = self.replayer.plain_head()
            if plain is not None:  # and as the probes that leave it alone summarise it (kl_from_states)
                head_input = self.replayer.head_input(trace.states[-1])
                summary = summarise_head(head_input, *plain, batch.input_ids, mean_row=True)
                logprobs.append(RefLogProbs.from_logits(logits, spill, head_input, summary))
                lp = summary.next_logprob()
            else:
                logprobs.append(RefLogProbs.from_logits(logits, spill))
                lp = torch.cat([next_token_logprob(torch.log_softmax(logits[row:row + 1].float(), dim=-1),
                                                   batch.input_ids[row:row + 1])
                                for row in range(logits.shape[0])])  # a sequence at a time: see from_logits
            next_lp.append(lp)
            valid = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool()
            nll_sum += float(-lp[valid].sum())
            nll_count += int(valid.sum())
            if on_batch:
                on_batch(number + 1, total)
        k_traces, hits, stride = [], [], None
        knowledge_tokens = sum(b.input_ids.numel() for b in data.knowledge_batches)
        for number, batch in enumerate(data.knowledge_batches):
            control.checkpoint()
            trace, _ = self.replayer.trace(batch, logits=False)  # the head at the answers only
            if stride is None:  # from the states as they are (a Mamba's stay float32 in a bfloat16 model)
                widest = max(s.shape[-1] * s.element_size() for s in trace.states)
                stride = knowledge_state_stride(self.anatomy.num_blocks, knowledge_tokens * widest)
            k_traces.append(trace.thinned(stride))
            mask = answer_positions_mask(tuple(batch.input_ids.shape), batch.answer_positions, batch.input_ids.device)
            hits += knowledge_correct_sparse(self.replayer.head_logits(trace.states[-1], mask), mask,
                                             batch.answer_positions, batch.answer_tokens)
            del trace
            release_freed_memory()  # the dropped states and the logits, before the next batch
            if on_batch:
                on_batch(len(data.eval_batches) + number + 1, total)
        import math

        figures = {"ppl": math.exp(nll_sum / max(nll_count, 1)), "tokens": float(data.eval_tokens),
                   "knowledge_accuracy": sum(hits) / len(hits) if hits else None,  # None: not scored
                   "reference_storage": "memory" if spill is None else "disk"}
        # The spill folder lives as long as the reference that reads from it.
        return Reference(traces, logprobs, next_lp, k_traces, hits, figures, extras={"spill": spill})

    def input_norms(self, data: EvalData, control: RunControl | None = None) -> dict[str, torch.Tensor]:
        """L2 norm of each input feature of every block linear over the calibration split."""
        if data.calibration_key in self._input_norms:
            return self._input_norms[data.calibration_key]
        data.require_calibration("Activation-aware modifications (Wanda, AWQ, SmoothQuant)")
        control = control or RunControl()
        sums = {name: None for name in self.anatomy.linear_names()}
        handles = []

        def hook(name, mask_holder):
            def record(module, args):
                x = args[0].float()
                mask = mask_holder[0]
                rows = x[mask.bool()] if mask is not None and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
                value = (rows ** 2).sum(0)
                sums[name] = value if sums[name] is None else sums[name] + value
            return record

        mask_holder = [None]
        for name in sums:
            handles.append(self.anatomy.linear(name).register_forward_pre_hook(hook(name, mask_holder)))
        try:
            for batch in data.calibration_batches:
                control.checkpoint()
                mask_holder[0] = batch.attention_mask
                with torch.inference_mode(), stop_before(self.model, self.anatomy.after_blocks):  # block linears only
                    self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        norms = {name: value.sqrt() for name, value in sums.items() if value is not None}
        self._input_norms[data.calibration_key] = norms
        return norms

    def gradient_norms(self, data: EvalData, control: RunControl | None = None) -> dict[str, torch.Tensor]:
        """Per weight of every block linear, (out, in): sqrt of the summed squared gradient of the LM loss
        over calibration chunks of GRADIENT_CHUNK tokens (the empirical Fisher's diagonal, as
        LLM-Pruner and GBLM use). One gradient per chunk, not per batch: a batch's gradient
        averages its tokens' gradients away, and the sum of its square is a poor estimate."""
        from modeldoctor.model.anatomy import weight_matrix

        if data.calibration_key in self._grad_norms:
            return self._grad_norms[data.calibration_key]
        data.require_calibration("Gradient-aware pruning")
        control = control or RunControl()
        names = self.anatomy.linear_names()
        weights = {name: self.anatomy.linear(name).weight for name in names}
        sums = {name: torch.zeros_like(w) for name, w in weights.items()}
        with gradients_only_for(self.model, weights.values()):
            for batch in data.calibration_batches:
                for row, mask in zip(batch.input_ids, batch.attention_mask):
                    ids = row[mask.bool()]
                    for start in range(0, len(ids) - 1, GRADIENT_CHUNK):
                        control.checkpoint()
                        piece = ids[start:start + GRADIENT_CHUNK][None]
                        if piece.shape[1] < 2:
                            continue
                        with torch.enable_grad():
                            self.model(input_ids=piece, labels=piece, use_cache=False).loss.backward()
                        for name, weight in weights.items():
                            sums[name] += weight.grad.detach() ** 2
                            weight.grad = None
        # Stored (out, in) like weight_matrix, so no consumer has to guess a Conv1D's orientation.
        norms = {name: weight_matrix(self.anatomy.linear(name), value.sqrt()).contiguous()
                 for name, value in sums.items()}
        self._grad_norms[data.calibration_key] = norms
        return norms

    def mod_context(self, data: EvalData | None = None, need_norms: bool = False,
                    control: RunControl | None = None, need_gradients: bool = False,
                    keep: frozenset[str] = frozenset()) -> ModContext:
        norms = self.input_norms(data, control) if need_norms and data is not None else {}
        grads = self.gradient_norms(data, control) if need_gradients and data is not None else {}
        ranges = (lambda: self.kv_ranges(data, control)) if data is not None else None
        usage = (lambda: self.expert_usage(data, control)) if data is not None and self.anatomy.moe_blocks() else None
        return ModContext(self.model, self.anatomy, norms, grads, frozenset(keep), kv_ranges=ranges,
                          expert_usage=usage)

    def kv_ranges(self, data: EvalData, control: RunControl | None = None) -> dict:
        """Block -> the largest size of each (head, channel) of its cached keys and values over the
        calibration split (per-channel KV-cache scales fit on it)."""
        from modeldoctor.modifications.kvcache import cache_ranges

        if data.calibration_key not in self._kv_ranges:
            data.require_calibration("Per-channel KV-cache scales")
            control = control or RunControl()
            rows = [row[mask.bool()] for batch in data.calibration_batches
                    for row, mask in zip(batch.input_ids, batch.attention_mask)]
            self._kv_ranges[data.calibration_key] = cache_ranges(self.model, self.anatomy, rows, control.checkpoint)
        return self._kv_ranges[data.calibration_key]

    def expert_usage(self, data: EvalData, control: RunControl | None = None) -> dict:
        """Block -> tokens sent to each expert of a mixture of experts over the calibration split
        (what drop-least-used and the per-expert keep choices fit on)."""
        from modeldoctor.metrics.routing import usage_on

        if data.calibration_key not in self._expert_usage:
            data.require_calibration("The experts' usage")
            self._expert_usage[data.calibration_key] = usage_on(self, data.calibration_batches, control)
        return self._expert_usage[data.calibration_key]

    # ---- treatments ------------------------------------------------------------------------
    def begin_weight_treatment(self) -> None:
        """Keep the untreated weights (once) before a treatment writes to the model."""
        if self.treatment.original is None:
            self.treatment.original_digest = self.weights_digest()
            self.treatment.original = self.snapshot_parameters()

    def weights_changed(self, function_preserving: bool) -> None:
        """Calibration statistics and measurements belong to the weights they were made on."""
        self._input_norms.clear()
        self._grad_norms.clear()
        self._kv_ranges.clear()
        self._expert_usage.clear()
        self.weights_version += 1
        self.treatment.function_preserving = self.treatment.function_preserving and function_preserving

    def snapshot_parameters(self) -> dict[str, torch.Tensor]:
        """A copy of every parameter to restore later. On the CPU it lives in files the operating
        system pages in on demand, not in a second copy in memory, so a model needs about its own
        size in RAM while treated; on a GPU it is a copy in device memory."""
        params = dict(self.model.named_parameters())
        if self.device.type != "cpu":
            return {name: p.detach().clone() for name, p in params.items()}
        spill = ReferenceSpill(prefix="modeldoctor-weights-", what="the copy of the untreated weights")
        snapshot = _Snapshot({name: spill.copy_of(p.detach()) for name, p in params.items()})
        snapshot.spill = spill  # the files live as long as the snapshot
        return snapshot

    @torch.no_grad()
    def load_parameters(self, values: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in values.items():
            params[name].copy_(value)

    @contextlib.contextmanager
    def original_weights(self):
        """The untreated model for the duration: references and validation compare against it.
        The parameters' tensors are swapped, not copied, so entering costs no memory traffic;
        the body must not write to the weights."""
        if self.treatment.original is None:
            yield
            return
        params = dict(self.model.named_parameters())
        treated = {name: params[name].data for name in self.treatment.original}
        for name, value in self.treatment.original.items():
            params[name].data = value
        try:
            yield
        finally:
            for name, value in treated.items():
                params[name].data = value

    def reset_treatments(self) -> None:
        """Back to the model as loaded, bit-exact (checked by digest)."""
        if self.treatment.original is not None:
            self.load_parameters(self.treatment.original)
            expected = self.treatment.original_digest
            if self.weights_digest() != expected:
                raise RuntimeError("Restoring the untreated weights did not reproduce them exactly.")
            self.weights_changed(function_preserving=True)
        self.treatment = TreatmentState()

    # ---- integrity -----------------------------------------------------------------------
    def weights_digest(self) -> str:
        """SHA-256 over every parameter and buffer: equal digests mean bit-exact weights."""
        digest = hashlib.sha256()
        for name, tensor in list(self.model.state_dict(keep_vars=False).items()):
            digest.update(name.encode())
            # the array's own buffer: tobytes() would copy the largest table (the embedding) once more
            digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
                          if tensor.numel() else b"")
        structure = ",".join(type(b).__name__ for b in self.anatomy.block_list)
        digest.update(structure.encode())
        return digest.hexdigest()
