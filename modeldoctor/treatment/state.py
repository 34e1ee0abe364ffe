"""What treatments have done to a session's model so far.

The session's model is treated in place (scales folded, weights pruned); the original weights
are kept here so that the reference is always the untreated model and a reset is bit-exact.
Choices that are not weights (layers kept in fp32, a calibrated temperature, a recovery
prompt) are recorded for the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TreatmentState:
    original: dict[str, torch.Tensor] | None = None  # parameter name -> untreated value
    original_digest: str | None = None
    function_preserving: bool = True  # False once a treatment changed what the float model computes
    keep: list[str] = field(default_factory=list)  # linears kept in fp32 by mixed precision
    keep_for: str | None = None  # the modification that keep list was chosen for
    temperature: float = 1.0  # divide the logits by this (decoding calibration)
    temperature_for: str | None = None
    recovery: dict | None = None  # knowledge-recovery prompts and the per-input selection rule
    applied: list[dict] = field(default_factory=list)  # one summary per applied treatment, in order

    @property
    def treated(self) -> bool:
        return bool(self.applied)

    @property
    def weights_changed(self) -> bool:
        return self.original is not None

    def describe(self) -> str:
        if not self.applied:
            return "untreated"
        return "; ".join(item["summary"] for item in self.applied)

    def as_dict(self) -> dict:
        return {"applied": list(self.applied), "kept_in_fp32": list(self.keep), "kept_for": self.keep_for,
                "temperature": self.temperature, "temperature_for": self.temperature_for,
                "recovery": self.recovery, "float_function_preserved": self.function_preserving}

    def inherit(self, card: dict) -> None:
        """Take the choices a saved treated model carries; its weights are already treated."""
        self.keep, self.keep_for = list(card.get("kept_in_fp32") or []), card.get("kept_for")
        self.temperature = float(card.get("temperature") or 1.0)
        self.temperature_for = card.get("temperature_for")
        self.recovery = card.get("recovery")
        self.applied = [{**item, "inherited": True} for item in card.get("applied") or []]

    def choices(self) -> dict:
        """The non-weight choices, to put back after a rollback."""
        return {"keep": list(self.keep), "keep_for": self.keep_for, "temperature": self.temperature,
                "temperature_for": self.temperature_for, "recovery": self.recovery,
                "applied": list(self.applied), "function_preserving": self.function_preserving}

    def restore_choices(self, saved: dict) -> None:
        self.keep, self.keep_for = list(saved["keep"]), saved["keep_for"]
        self.temperature, self.temperature_for = saved["temperature"], saved["temperature_for"]
        self.recovery, self.applied = saved["recovery"], list(saved["applied"])
        self.function_preserving = saved["function_preserving"]
