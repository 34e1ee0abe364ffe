"""How far generations under other decoding settings drift from greedy decoding."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from modeldoctor.modifications.decoding import DecodingSettings

NEW_TOKENS = 32


@dataclass
class Continuation:
    prompt_ids: list[int]
    tokens: list[int]


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0))


def beams_keep_cache(model) -> bool:
    """Whether beam search may use the model's cache. Mamba, Mamba2 and FalconMamba keep their
    states in `cache_params`, which transformers' beam search never reorders (it reorders
    past_key_values only), so a cached beam search continues each beam from another's state:
    measured on the tiny Mamba models, the cached beams' tokens differ from the uncached ones."""
    return "cache_params" not in inspect.signature(model.forward).parameters


def generate(model, tokenizer, prompt_ids: list[int], settings: DecodingSettings,
             new_tokens: int = NEW_TOKENS, seed: int = 0) -> list[int]:
    ids = torch.tensor([prompt_ids])
    kwargs = settings.generate_kwargs()
    if kwargs.get("num_beams", 1) > 1 and not beams_keep_cache(model):
        kwargs["use_cache"] = False  # every step recomputed: slower, but each beam its own states
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=_pad_id(tokenizer), **kwargs,
        )
    return out[0, len(prompt_ids):].tolist()


def reference_continuations(model, tokenizer, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list[Continuation]:
    greedy = DecodingSettings()
    result = []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        result.append(Continuation(prompt_ids, generate(model, tokenizer, prompt_ids, greedy, new_tokens)))
    return result


def processors(settings: DecodingSettings) -> LogitsProcessorList:
    items = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        items.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.do_sample:
        if settings.temperature != 1.0:
            items.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            items.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            items.append(TopPLogitsWarper(settings.top_p))
    return items


def trajectory_kl(model, continuation: Continuation, settings: DecodingSettings) -> list[float]:
    """KL(decoding distribution || model distribution) at each step of the greedy trajectory.
    This direction stays finite when top-k / top-p remove tokens."""
    ids = torch.tensor([continuation.prompt_ids + continuation.tokens])
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    chain = processors(settings)
    start = len(continuation.prompt_ids) - 1
    values = []
    for step in range(len(continuation.tokens)):
        position = start + step
        raw = logits[position][None]
        logp_ref = torch.log_softmax(raw, -1)
        logp_mod = torch.log_softmax(chain(ids[:, : position + 1], raw.clone()), -1)
        p_mod = logp_mod.exp()
        terms = torch.where(p_mod > 0, p_mod * (logp_mod - logp_ref), torch.zeros_like(p_mod))
        values.append(float(terms.sum()))
    return values


def compare(model, tokenizer, references: list[Continuation], settings: DecodingSettings, seed: int = 0) -> tuple[dict, list[dict]]:
    """Metrics over all prompts, and the continuations side by side."""
    agreement, first, identical, kls, samples = [], [], [], [], []
    for number, ref in enumerate(references):
        tokens = generate(model, tokenizer, ref.prompt_ids, settings, len(ref.tokens), seed + number)
        same = [a == b for a, b in zip(tokens, ref.tokens)]
        agreement.append(np.mean(same))
        first.append(same.index(False) if False in same else len(same))
        identical.append(all(same))
        kls.extend(trajectory_kl(model, ref, settings))
        samples.append({
            "prompt": tokenizer.decode(ref.prompt_ids, skip_special_tokens=True),
            "reference": tokenizer.decode(ref.tokens, skip_special_tokens=True),
            "modified": tokenizer.decode(tokens, skip_special_tokens=True),
        })
    metrics = {
        "token_agreement": float(np.mean(agreement)),
        "first_divergence": float(np.mean(first)),
        "identical": float(np.mean(identical)),
        "kl_trajectory": float(np.mean(kls)),
        "tokens": float(len(kls)),
    }
    return metrics, samples


def cached_step_logprobs(model, continuation: Continuation) -> torch.Tensor:
    """Log-probabilities of each step of a continuation as generation computes them: the prompt
    prefilled into a KV cache, then one token per call reading the cache back (teacher-forced on
    the given tokens, so two models are compared on the same text): (steps, V)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    steps = []
    with torch.inference_mode():
        ids = torch.tensor([continuation.prompt_ids])
        for token in [None] + continuation.tokens[:-1]:
            if token is not None:
                ids = torch.tensor([[token]])
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            steps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    return torch.stack(steps)


def cached_generation_kl(reference_steps: list[torch.Tensor], model, references: list[Continuation]) -> dict:
    """Mean KL(reference ‖ model) over generation steps read through the model's KV cache, given
    the reference's own step log-probabilities (cached_step_logprobs of the unmodified model)."""
    kls = []
    for ref_logp, continuation in zip(reference_steps, references):
        logq = cached_step_logprobs(model, continuation)
        kls.append((ref_logp.exp() * (ref_logp - logq)).sum(-1).clamp(min=0))
    values = torch.cat(kls)
    return {"kl_generation": float(values.mean()), "generation_tokens": float(len(values))}
