"""Checkup results: one record per probe, saved as JSON (the source of truth) and CSV."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProbeSpec:
    """One measurement: a modification applied to some targets under a scan mode."""

    index: int
    modification: str
    family: str  # quantize | prune | structure | decoding
    mode: str  # isolated | cumulative | sweep-model | sweep-block | decoding
    targets: tuple[str, ...]  # block indices ("3") or linears ("3.mlp.down_proj"); () for decoding
    block: int  # first block touched: the prefix cache starts there
    step: int | None = None  # cumulative: how many targets are modified
    strength: float | None = None  # sweeps: bits or sparsity

    @property
    def target(self) -> str:
        """A short label for what was modified."""
        if not self.targets:
            return "model"
        if self.mode == "cumulative":
            return f"{self.targets[0]} … {self.targets[-1]} ({len(self.targets)})"
        if self.mode == "sweep-model":
            return "all blocks"
        return self.targets[0]

    @property
    def label(self) -> str:
        return f"{self.modification} @ {self.target}"

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeSpec":
        return cls(**{**data, "targets": tuple(data["targets"])})


@dataclass(frozen=True)
class ProbeRecord:
    spec: ProbeSpec
    metrics: dict[str, float]
    bleeding: bool
    severity: str  # healthy | mild | moderate | severe
    reason: str  # why it was (not) called bleeding
    cascade: dict[str, list[float]] = field(default_factory=dict)
    attention: dict[str, list[float]] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    basis: str = "measured"  # measured (an exact probe) | estimated (the first stage's estimate)
    knowledge_seconds: float = 0.0  # of `seconds`, what scoring its knowledge probes took
    # Mixtures of experts: per MoE block ("blocks"), the routing flip rate and the load per expert,
    # original and modified (fractions of the tokens); see metrics/routing.py.
    routing: dict[str, list] = field(default_factory=dict)

    @property
    def estimated(self) -> bool:
        return self.basis == "estimated"

    @property
    def score(self) -> float:
        """The figure bleeding is judged on: mean KL (or trajectory KL for decoding)."""
        return self.metrics.get("kl_mean", self.metrics.get("kl_trajectory", 0.0))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["spec"]["targets"] = list(self.spec.targets)
        return _json_safe(data)

    @classmethod
    def from_dict(cls, data: dict) -> "ProbeRecord":
        return cls(**{**data, "spec": ProbeSpec.from_dict(data["spec"])})


@dataclass
class CheckupReport:
    model: dict[str, Any]
    plan: dict[str, Any]
    data: dict[str, Any]
    reference: dict[str, float]
    probes: list[ProbeRecord] = field(default_factory=list)
    status: str = "running"  # running | completed | cancelled | failed
    elapsed_s: float = 0.0
    findings: dict[str, Any] = field(default_factory=dict)
    # The long-context probe (checkup.context.run_context_sweep); empty when the plan had none.
    context: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    # ---- queries -------------------------------------------------------------------------
    def by_mode(self, mode: str) -> list[ProbeRecord]:
        return [p for p in self.probes if p.spec.mode == mode]

    def bleeding(self) -> list[ProbeRecord]:
        return sorted((p for p in self.probes if p.bleeding), key=lambda p: p.score, reverse=True)

    def ranked(self, mode: str = "isolated") -> list[ProbeRecord]:
        return sorted(self.by_mode(mode), key=lambda p: p.score, reverse=True)

    def modifications(self) -> list[str]:
        return list(dict.fromkeys(p.spec.modification for p in self.probes))

    def reference_knowledge(self) -> float | None:
        """The original model's knowledge-probe accuracy; None when no knowledge probes were scored
        (older sessions stored NaN for that)."""
        value = self.reference.get("knowledge_accuracy")
        return None if value is None or value != value else float(value)

    def measured_on(self) -> str:
        """Which text every figure of this report is on, in words."""
        data = self.data
        source = {"builtin": "the built-in text", "self": "text the model wrote"}.get(
            data.get("source"), Path(str(data.get("source", "?"))).name)
        split = data.get("split", "evaluation")
        tokens = int(self.reference.get("tokens", data.get("eval_tokens", 0)))
        text = f"{tokens} tokens of the {split} split of {source}"
        if split == "evaluation" and data.get("calibration_tokens"):
            text += f" (fits on {data['calibration_tokens']} separate calibration tokens)"
        if self.reference.get("model"):
            text += f"; reference: the {self.reference['model']}"
        return text

    # ---- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _json_safe({
            "version": self.version, "status": self.status, "elapsed_s": self.elapsed_s,
            "model": self.model, "plan": self.plan, "data": self.data, "reference": self.reference,
            "findings": self.findings, "probes": [p.to_dict() for p in self.probes], "context": self.context,
        })

    @classmethod
    def from_dict(cls, data: dict) -> "CheckupReport":
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported checkup file version {data.get('version')}")
        return cls(
            model=data["model"], plan=data["plan"], data=data["data"], reference=data["reference"],
            probes=[ProbeRecord.from_dict(p) for p in data["probes"]], status=data["status"],
            elapsed_s=data["elapsed_s"], findings=data.get("findings", {}), context=data.get("context", {}),
        )

    def save(self, folder: str | os.PathLike) -> Path:
        """Write checkup.json and checkup.csv into folder, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "checkup.json"
        _atomic_write(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))
        _atomic_write(folder / "checkup.csv", self.to_csv())
        return path

    def save_file(self, path: str | os.PathLike) -> Path:
        """Write the whole report as one JSON file (a saved app session), atomically."""
        path = Path(path)
        _atomic_write(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CheckupReport":
        from modeldoctor.errors import ModelDoctorError

        path = Path(path)
        if path.is_dir():
            path = path / "checkup.json"
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ModelDoctorError(f"No checkup results at {path}.") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelDoctorError(f"{path} is not a Model Doctor checkup file ({exc}).") from None

    def to_csv(self) -> str:
        metric_names = list(dict.fromkeys(k for p in self.probes for k in p.metrics))
        spec_names = [f.name for f in fields(ProbeSpec)]
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(spec_names + ["bleeding", "severity"] + metric_names)
        for probe in self.probes:
            spec = asdict(probe.spec)
            spec["targets"] = " ".join(probe.spec.targets)
            writer.writerow([spec[n] for n in spec_names] + [probe.bleeding, probe.severity]
                            + [probe.metrics.get(m, "") for m in metric_names])
        return buffer.getvalue()


def _json_safe(value):
    """NaN and infinity are not JSON: store them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _json_safe(value.item())
    return value


def _atomic_write(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
