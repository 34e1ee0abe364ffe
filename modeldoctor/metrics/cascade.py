"""How a modification's error travels through the blocks downstream of it."""

from __future__ import annotations

import numpy as np
import torch


class CascadeAccumulator:
    """Token-weighted mean relative error and cosine drift of each block's output."""

    def __init__(self, num_blocks: int) -> None:
        self.rel_error = np.zeros(num_blocks)
        self.cos_drift = np.zeros(num_blocks)
        self.tokens = 0

    def add(self, ref_states: list[torch.Tensor], mod_states: dict[int, torch.Tensor],
            attention_mask: torch.Tensor) -> None:
        """ref_states[j+1] / mod_states[j+1] are the outputs of block j."""
        mask = attention_mask.bool()
        count = int(mask.sum())
        for j in range(len(self.rel_error)):
            mod = mod_states.get(j + 1)
            if mod is None:
                continue  # upstream of the modification: identical by construction
            ref = ref_states[j + 1][mask].float()
            out = mod[mask].float()
            rel = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12)
            cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
            self.rel_error[j] += float(rel.sum())
            self.cos_drift[j] += float((1 - cos).clamp(min=0).sum())
        self.tokens += count

    def result(self) -> dict[str, list[float]]:
        n = max(self.tokens, 1)
        return {"rel_error": (self.rel_error / n).tolist(), "cos_drift": (self.cos_drift / n).tolist()}
