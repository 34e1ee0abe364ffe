"""Export a repaired ONNX model: export, quantize with exclusions, validate, then hand over.

Writes are atomic: everything is built in a hidden folder beside the target and renamed
into place only when validation passed; a cancelled, failed or over-budget export leaves
nothing behind, and an existing target is replaced only when the caller allows it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from modeldoctor import __version__
from modeldoctor.atomic import prepare_target, replace_folder, staging_folder
from modeldoctor.control import RunControl
from modeldoctor.data import EvalData
from modeldoctor.errors import CancelledError, ModelDoctorError
from modeldoctor.events import Event, Failed, Finished, LogMessage, Stage
from modeldoctor.export.mapping import map_linears
from modeldoctor.export.onnx_export import export_fp32
from modeldoctor.export.quantize import PRECISIONS, quantize_model, refuse_collapse_modes
from modeldoctor.export.validate import latency, validate
from modeldoctor.export.runtime import OnnxCausalLM
from modeldoctor.report.results import CheckupReport
from modeldoctor.session import Session

DEFAULT_BUDGET_KL = 0.02
# Which checkup modification predicts each export precision, most faithful first.
PREDICTORS = {"int8": ("int8-dynamic",), "int4": ("int4-g32-asym", "int4-g32", "int4-g64-asym", "int4")}


@dataclass
class ExportResult:
    path: str | None  # where the model now is (None when nothing was handed over)
    precision: str
    passed: bool
    budget_kl: float
    excluded_linears: list[str]
    excluded_nodes: list[str]
    validation: dict[str, float]
    fp32: dict[str, float]
    message: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def predicted_kl(report: CheckupReport, precision: str) -> tuple[str | None, dict[str, float], set[str]]:
    """(modification used, isolated KL per target, targets the verdict calls bleeding)."""
    for name in PREDICTORS.get(precision, ()):
        probes = [p for p in report.probes if p.spec.modification == name and p.spec.mode == "isolated"]
        if probes:
            return name, {p.spec.targets[0]: p.score for p in probes}, {p.spec.targets[0] for p in probes if p.bleeding}
    return None, {}, set()


def choose_exclusions(session: Session, report: CheckupReport | None, precision: str,
                      budget_kl: float) -> tuple[list[str], list[str]]:
    """Linears to keep in fp32: every bleeding one, then the worst others until the sum of the
    remaining predicted KLs fits half the budget (isolated KLs roughly add up)."""
    notes: list[str] = []
    if report is None or precision == "fp32":
        return [], notes
    modification, kl, bleeding = predicted_kl(report, precision)
    if modification is None:
        notes.append(f"The checkup has no {' or '.join(PREDICTORS[precision])} probes, so no layer is kept in "
                      "fp32 automatically.")
        return [], notes
    anatomy = session.anatomy

    def expand(target: str) -> list[str]:
        return [target] if "." in target else [f"{target}.{rel}" for rel in anatomy.blocks[int(target)].linears]

    chosen = [t for t in sorted(kl, key=kl.get, reverse=True) if t in bleeding]
    remaining = sum(v for t, v in kl.items() if t not in bleeding)
    for target in sorted((t for t in kl if t not in bleeding), key=kl.get, reverse=True):
        if remaining <= budget_kl / 2:
            break
        chosen.append(target)
        remaining -= kl[target]
    notes.append(f"From the checkup's {modification} probes: {len(bleeding)} bleeding and "
                 f"{len(chosen) - len(bleeding)} more to fit the budget; predicted KL of the rest {remaining:.4f}.")
    return [n for t in chosen for n in expand(t)], notes


def export_model(session: Session, data: EvalData, target: str | os.PathLike, precision: str = "int8",
                 report: CheckupReport | None = None, exclude: list[str] | None = None,
                 budget_kl: float = DEFAULT_BUDGET_KL, overwrite: bool = False, prompts: list[str] | None = None,
                 control: RunControl | None = None) -> Iterator[Event]:
    """Yield events; the last is Finished with an ExportResult (or Failed then Finished)."""
    control = control or RunControl()
    target = Path(target).expanduser().resolve()
    staging = staging_folder(target)
    try:
        if precision not in PRECISIONS:
            raise ModelDoctorError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
        prepare_target(target, overwrite, session.summary.memory_bytes * 3)
        treated = session.treatment
        if exclude is not None:
            excluded, notes = list(exclude), []
        elif precision in PREDICTORS and treated.keep and treated.keep_for in PREDICTORS[precision]:
            excluded = list(treated.keep)
            notes = [f"Keeping the {len(excluded)} linears that the mixed-precision treatment chose for "
                     f"{treated.keep_for} in fp32."]
        else:
            excluded, notes = choose_exclusions(session, report, precision, budget_kl)
        for note in notes:
            yield LogMessage(note)
        yield Stage("export", "optimum-onnx, fp32, with past key values")
        fp32_path = export_fp32(session.model, session.tokenizer, staging / "fp32")
        control.checkpoint()
        fp32_latency = latency(OnnxCausalLM(fp32_path))
        fp32 = {"size_bytes": float(sum(p.stat().st_size for p in fp32_path.parent.glob("*.onnx*"))),
                "latency_s": fp32_latency}
        excluded_nodes: list[str] = []
        if precision == "fp32":
            final = fp32_path.parent
        else:
            import onnx

            mapping, missing = map_linears(onnx.load(str(fp32_path)), session.anatomy)
            unknown = [n for n in excluded if n not in mapping]
            if unknown:
                raise ModelDoctorError(f"No ONNX node computes {', '.join(unknown[:5])}; cannot keep it in fp32.")
            excluded_nodes = [mapping[n] for n in excluded]
            yield Stage("quantize", f"{precision}, {len(excluded_nodes)} MatMuls kept in fp32")
            final = staging / "model"
            final.mkdir()
            quantize_model(fp32_path, final / fp32_path.name, precision, excluded_nodes)
            refuse_collapse_modes(final / fp32_path.name)
            for extra in fp32_path.parent.iterdir():
                if extra.suffix != ".onnx" and not extra.name.endswith(".onnx_data"):
                    shutil.copy2(extra, final / extra.name)
        control.checkpoint()
        yield Stage("validate", f"against the torch model on {data.eval_tokens} tokens")
        from modeldoctor.checkup.run import _decoding_prompts

        temperature = treated.temperature if treated.temperature_for in (PREDICTORS.get(precision, ()) + ("none",)) \
            else 1.0
        if temperature != 1.0:
            _set_generation_temperature(final, temperature)
        figures = validate(session.model, session.tokenizer, data, final / fp32_path.name,
                           prompts if prompts is not None else _decoding_prompts(), fp32_latency, control,
                           original=session.original_weights, temperature=temperature)
        passed = figures["kl_mean"] <= budget_kl
        message = (f"mean KL {figures['kl_mean']:.4f} {'≤' if passed else '>'} budget {budget_kl:g}; "
                   f"top-1 {figures['same_top']:.1%}; size {figures['size_bytes'] / fp32['size_bytes']:.0%} of fp32; "
                   f"latency ×{figures.get('latency_ratio', 1):.2f}")
        result = ExportResult(str(target) if passed else None, precision, passed, budget_kl, excluded,
                              excluded_nodes, figures, fp32, message, notes)
        if not passed:
            yield Failed(f"Export over budget, nothing written: {message}. Keep more layers in fp32 "
                         "(or treat the bleeding ones) and export again.")
            yield Finished("failed", message, result)
            return
        _write_card(final, result, report, treated.as_dict() if treated.treated else None, temperature)
        replace_folder(final, target)
        yield Finished("completed", message, result)
    except CancelledError as exc:
        yield Finished("cancelled", str(exc))
    except ModelDoctorError as exc:
        yield Failed(str(exc))
        yield Finished("failed", str(exc))
    except OSError as exc:
        yield Failed(f"Could not write the export: {exc.strerror or exc}.")
        yield Finished("failed", str(exc))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _set_generation_temperature(folder: Path, temperature: float) -> None:
    """The calibrated temperature scales whatever sampling temperature the config had."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["temperature"] = round(float(config.get("temperature") or 1.0) * temperature, 6)
    config["modeldoctor_calibrated_temperature"] = round(temperature, 6)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _write_card(folder: Path, result: ExportResult, report: CheckupReport | None, treatment: dict | None = None,
                temperature: float = 1.0) -> None:
    card = {"modeldoctor_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "precision": result.precision, "kept_in_fp32": result.excluded_linears,
            "kept_in_fp32_onnx_nodes": result.excluded_nodes,
            "treatments_applied": treatment["applied"] if treatment else [],
            "calibrated_temperature": temperature,
            "recovery_prompts": treatment.get("recovery") if treatment else None,
            "validation": result.validation, "fp32_onnx": result.fp32, "budget_kl": result.budget_kl,
            "passed": result.passed, "notes": result.notes}
    if report is not None:
        from modeldoctor.checkup.diagnosis import diagnose

        card["model"] = report.model
        card["diagnosis"] = [asdict(f) for f in diagnose(report)]
    (folder / "modeldoctor.json").write_text(json.dumps(card, indent=1), encoding="utf-8")
