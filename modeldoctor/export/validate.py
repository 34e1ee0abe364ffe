"""Validate an exported model against the original torch model, always, after every export."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch

from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.export.runtime import OnnxCausalLM
from modeldoctor.metrics.divergence import RefLogProbs, next_token_logprob, summarise

GREEDY_TOKENS = 32
LATENCY_TOKENS = 128
LATENCY_RUNS = 5
DECODE_CACHE = 256  # the decode speed is one token after this many cached ones


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".onnx", ".data", ".onnx_data"))


def sequences(data: EvalData) -> list[np.ndarray]:
    """Evaluation sequences one by one, as deployment runs them (batch 1)."""
    return [row[mask.bool()].numpy()[None] for b in data.eval_batches for row, mask in zip(b.input_ids, b.attention_mask)]


def latency(model: OnnxCausalLM, tokens: int = LATENCY_TOKENS) -> float:
    """Median seconds to prefill a fixed batch (1 x tokens) (see DECODE_CACHE for the decode speed)."""
    ids = (np.arange(tokens, dtype=np.int64) % 1000 + 10)[None]
    model.logits(ids)  # warm-up
    times = []
    for _ in range(LATENCY_RUNS):
        began = time.perf_counter()
        model.logits(ids)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def validate(torch_model, tokenizer, data: EvalData, onnx_path: Path, prompts: list[str],
             baseline_latency_s: float | None = None, control: RunControl | None = None,
             original: Callable[[], ContextManager] = contextlib.nullcontext, temperature: float = 1.0,
             baseline_decode_s: float | None = None) -> dict:
    """KL statistics, top-1 agreement, perplexity and greedy agreement against the torch model
    as `original()` makes it (the untreated weights), plus size on disk and latency (and its
    ratio to a baseline, the fp32 ONNX model). The exported logits are divided by the
    calibrated `temperature`, as its generation config does when sampling."""
    control = control or RunControl()
    model = OnnxCausalLM(onnx_path)
    kl, same, nll_mod, nll_ref, delta = [], [], [], [], []
    for seq in sequences(data):
        control.checkpoint()
        with original(), torch.inference_mode():
            ref_logits = torch_model(input_ids=torch.from_numpy(seq)).logits.float()
        mod_logits = torch.from_numpy(model.logits(seq)).float() / temperature
        ref = RefLogProbs.from_logits(ref_logits)
        logq = torch.log_softmax(mod_logits, -1)
        ids = torch.from_numpy(seq)
        kl.append(ref.kl_to(logq).flatten().numpy())
        same.append((mod_logits.argmax(-1) == ref.argmax).flatten().numpy())
        mod_next = next_token_logprob(logq, ids).flatten()
        ref_next = next_token_logprob(torch.log_softmax(ref_logits, -1), ids).flatten()
        nll_mod.append((-mod_next).numpy())
        nll_ref.append((-ref_next).numpy())
        delta.append((mod_next.exp() - ref_next.exp()).numpy())
    figures = summarise(np.concatenate(kl).astype(np.float64), np.concatenate(same),
                        np.concatenate(nll_mod).astype(np.float64), np.concatenate(nll_ref).astype(np.float64),
                        np.concatenate(delta).astype(np.float64))
    identical, first = [], []
    for prompt in prompts:
        control.checkpoint()
        prompt_ids = tokenizer(prompt)["input_ids"]
        with original(), torch.inference_mode():
            out = torch_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                       dtype=torch.long), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                                       do_sample=False, temperature=None, top_p=None, top_k=None,
                                       pad_token_id=tokenizer.eos_token_id)
        expected = out[0, len(prompt_ids):].tolist()
        got = model.greedy(prompt_ids, len(expected))
        same_tokens = [a == b for a, b in zip(got, expected)]
        identical.append(all(same_tokens))
        first.append(same_tokens.index(False) if False in same_tokens else len(same_tokens))
    figures["greedy_identical"] = float(np.mean(identical))
    figures["greedy_first_divergence"] = float(np.mean(first))
    figures["size_bytes"] = float(folder_bytes(onnx_path.parent))
    figures["latency_s"] = latency(model)
    if baseline_latency_s:
        figures["latency_ratio"] = figures["latency_s"] / baseline_latency_s
    decode = model.decode_step_seconds(DECODE_CACHE)
    if decode is not None:
        figures["decode_s"] = decode
        if baseline_decode_s:
            figures["decode_ratio"] = decode / baseline_decode_s
    return figures
