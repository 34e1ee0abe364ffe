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
from modeldoctor.events import Event, Failed, Finished, LogMessage, Progress, Stage
from modeldoctor.export.onnx_export import export_fp32
from modeldoctor.export.quantize import INT4_BLOCK, PRECISIONS, quantize_export
from modeldoctor.export.validate import latency, validate
from modeldoctor.export.runtime import OnnxCausalLM
from modeldoctor.model.anatomy import HEAD
from modeldoctor.modifications.base import target_linears
from modeldoctor.report.results import CheckupReport
from modeldoctor.session import Session

DEFAULT_BUDGET_KL = 0.02
# The modification that simulates exactly what each precision's export writes: onnxruntime's
# quantize_dynamic (int8 weights per tensor, uint8 activations per call), and MatMulNBits
# (4-bit blocks of 32 along the input, with zero points); fp32 writes the model as it is.
# Only a probe, keep list or temperature made for exactly that format predicts or tunes it.
EXPORT_FORMATS = {"fp32": "none", "int8": "int8-dynamic", "int4": f"int4-g{INT4_BLOCK}-asym"}
PREDICTORS = {precision: mod for precision, mod in EXPORT_FORMATS.items() if precision != "fp32"}


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
    predicted_by: str | None = None  # the checkup modification whose probes predicted this export
    predicted_kl: float | None = None  # sum of their isolated KLs over what the export quantizes
    missing_checkup: str | None = None  # the modification to run a checkup of, when none predicted it
    predicted_bytes: int | None = None  # the size predicted before writing (predicted_size)

    def as_dict(self) -> dict:
        return asdict(self)


def predicted_kl(report: CheckupReport | None, precision: str) -> tuple[str | None, dict[str, float], set[str]]:
    """(modification used, isolated KL per target, targets the verdict calls bleeding), from the
    checkup's probes of exactly the format the export writes; (None, {}, set()) without them."""
    name = PREDICTORS.get(precision)
    probes = [p for p in report.probes if p.spec.modification == name and p.spec.mode == "isolated"] \
        if report is not None and name else []
    if not probes:
        return None, {}, set()
    return name, {p.spec.targets[0]: p.score for p in probes}, {p.spec.targets[0] for p in probes if p.bleeding}


def missing_checkup(report: CheckupReport | None, precision: str) -> str | None:
    """The modification a checkup must probe to predict this export, when the report has none."""
    if precision not in PREDICTORS or predicted_kl(report, precision)[0] is not None:
        return None
    return PREDICTORS[precision]


def missing_checkup_text(precision: str) -> str:
    name = PREDICTORS[precision]
    return (f"No checkup of {name} (what the {precision} export writes) predicts this export, so nothing is kept in "
            f"fp32 automatically and there is no predicted KL; run a checkup of {name} at linear scope to get both.")


# Bytes per weight of each format as the exporter writes it: int8 dynamic stores int8 weights with
# one scale and zero point per tensor; int4 MatMulNBits stores 4-bit weights plus an fp32 scale
# and a 4-bit zero point per block.
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1.0, "int4": 0.5 + (4 + 0.5) / INT4_BLOCK}


@dataclass(frozen=True)
class SizePrediction:
    bytes: int
    fp32_bytes: int
    kept: int  # linears left in fp32
    linears: int

    @property
    def fraction(self) -> float:
        return self.bytes / max(self.fp32_bytes, 1)


def predicted_size(session: Session, precision: str, excluded: list[str]) -> SizePrediction:
    """The export's weights on disk before it is written (an estimate: graph overhead and the
    KV-cache plumbing are left out, which matters only for tiny models). A tied head that is
    quantized adds a quantized copy beside the fp32 embedding the lookup keeps."""
    anatomy = session.anatomy
    fp32 = int(session.summary.parameters * 4)
    if precision == "fp32":
        return SizePrediction(fp32, fp32, len(anatomy.linear_targets()), len(anatomy.linear_targets()))
    kept = set(excluded)
    saved = 0.0
    for name in anatomy.linear_targets():
        if name in kept:
            continue
        weights = anatomy.linear(name).weight.numel()
        quantized = weights * BYTES_PER_WEIGHT[precision]
        saved += (-quantized) if name == HEAD and anatomy.head_tied else weights * 4 - quantized
    targets = anatomy.linear_targets()
    return SizePrediction(int(fp32 - saved), fp32, sum(1 for n in targets if n in kept), len(targets))


def remaining_kl(session: Session, kl: dict[str, float], excluded: list[str]) -> float:
    """Predicted KL of the export: the isolated KLs of the probed targets it quantizes (a
    block counts unless every linear in it is kept)."""
    kept = set(excluded)
    return float(sum(v for t, v in kl.items() if not set(target_linears(session.anatomy, t)) <= kept))


def free_exclusions(session: Session, precision: str) -> tuple[list[str], list[str]]:
    """Linears that stay fp32 unless a keep list says otherwise, and why: a head tied to the
    token embedding shares the fp32 weight the embedding lookup keeps anyway, so keeping it
    costs no space, while quantizing it writes a quantized copy beside that weight."""
    if precision == "fp32" or not session.anatomy.head_tied:
        return [], []
    return [HEAD], ["The LM head shares the token embedding's weight, so it stays fp32 at no cost in size "
                    "(quantizing it would add a quantized copy); untick 'head' to quantize it anyway."]


def choose_exclusions(session: Session, report: CheckupReport | None, precision: str,
                      budget_kl: float) -> tuple[list[str], list[str]]:
    """Linears to keep in fp32: a tied head (free), every bleeding one, then the worst others
    until the sum of the remaining predicted KLs fits half the budget (isolated KLs roughly
    add up)."""
    free, notes = free_exclusions(session, precision)
    modification, kl, bleeding = predicted_kl(report, precision)
    if modification is None:
        return free, notes
    chosen = free + [t for t in sorted(kl, key=kl.get, reverse=True) if t in bleeding and t not in free]
    remaining = sum(v for t, v in kl.items() if t not in chosen)
    for target in sorted((t for t in kl if t not in chosen), key=kl.get, reverse=True):
        if remaining <= budget_kl / 2:
            break
        chosen.append(target)
        remaining -= kl[target]
    notes.append(f"From the checkup's {modification} probes: {len(bleeding)} bleeding and "
                 f"{len(chosen) - len(set(bleeding) | set(free))} more to fit the budget; predicted KL of the rest "
                 f"{remaining:.4f}.")
    guessed = sum(1 for p in report.probes if p.spec.modification == modification and p.estimated)
    if guessed:
        notes.append(f"{guessed} of those figures are first-stage estimates, which run low (up to about 2× on the "
                     "sample), so the predicted KL is optimistic; an exhaustive checkup makes it exact.")
    return list(dict.fromkeys(n for t in chosen for n in target_linears(session.anatomy, t))), notes


class ExportSteps:
    """Progress through the export's steps. The time left is an estimate, scaled from the first step's
    time by the steps' rough relative lengths on the sample (quantizing about half as long as the
    fp32 export, validating about as long)."""

    WEIGHTS = {"export": 1.0, "quantize": 0.5, "validate": 1.0}

    def __init__(self, quantizes: bool) -> None:
        self.names = ["export"] + (["quantize"] if quantizes else []) + ["validate"]
        self.began = time.monotonic()
        self.first_took: float | None = None

    def enter_all(self, name: str, detail: str) -> Iterator[Event]:
        """The Stage event and a Progress event for the step now starting."""
        index = self.names.index(name)
        if index == 1:
            self.first_took = time.monotonic() - self.began
        eta = None
        if self.first_took is not None:
            left = sum(self.WEIGHTS[n] for n in self.names[index:])
            eta = self.first_took * left / self.WEIGHTS["export"]
        yield Stage(name, detail)
        yield Progress(index, len(self.names), time.monotonic() - self.began, eta, stage=name)


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
        written_format = EXPORT_FORMATS[precision]
        notes: list[str] = []
        if exclude is not None:
            excluded = list(exclude)
        elif precision != "fp32" and treated.keep and treated.keep_for == written_format:
            free, notes = free_exclusions(session, precision)
            excluded = list(dict.fromkeys(list(treated.keep) + free))
            notes.insert(0, f"Keeping the {len(treated.keep)} linears that the mixed-precision treatment chose for "
                            f"{treated.keep_for} in fp32.")
        elif precision != "fp32":
            if treated.keep:
                notes.append(f"The mixed-precision keep list was chosen for {treated.keep_for}, not for "
                             f"{written_format} (what this export writes), so it is not used.")
            excluded, chosen_notes = choose_exclusions(session, report, precision, budget_kl)
            notes += chosen_notes
            if report is not None and report.data.get("split", "evaluation") == "evaluation" \
                    and data.spec.split == "eval" and predicted_kl(report, precision)[0]:
                # A choice made on the text that then validates it is not held out.
                notes.append("The fp32 list comes from a checkup on the evaluation text, which this validation "
                             "also reads, so its figures are not fully held out; for held-out figures run the "
                             "checkup on the selection text (modeldoctor checkup --split selection).")
        else:
            excluded = []
        unknown = [n for n in excluded if n not in set(session.anatomy.linear_targets())]
        if unknown:
            raise ModelDoctorError(f"No linear named {', '.join(unknown[:5])} in this model; cannot keep it in fp32 "
                                   f"(linears are named like {session.anatomy.linear_names()[0]}, the LM head 'head').")
        predictor, kl, _ = predicted_kl(report, precision)
        missing = missing_checkup(report, precision)
        if missing:
            notes.append(missing_checkup_text(precision))
        elif predictor and HEAD not in excluded and HEAD not in kl:
            notes.append(f"The checkup did not probe the LM head (it does at linear scope), so the predicted KL "
                         f"leaves out what {precision} costs there.")
        if treated.temperature != 1.0 and treated.temperature_for != written_format:
            notes.append(f"The calibrated temperature {treated.temperature:.3f} was fitted for "
                         f"{treated.temperature_for}, not for {written_format} (what this export writes), so it "
                         "is not applied.")
        temperature = treated.temperature if treated.temperature_for == written_format else 1.0
        for note in notes:
            yield LogMessage(note)
        steps = ExportSteps(precision != "fp32")
        yield from steps.enter_all("export", "optimum-onnx, fp32, with past key values")
        fp32_path = export_fp32(session.model, session.tokenizer, staging / "fp32")
        control.checkpoint()
        fp32_latency = latency(OnnxCausalLM(fp32_path))
        fp32 = {"size_bytes": float(sum(p.stat().st_size for p in fp32_path.parent.glob("*.onnx*"))),
                "latency_s": fp32_latency}
        excluded_nodes: list[str] = []
        if precision == "fp32":
            final = fp32_path.parent
        else:
            yield from steps.enter_all("quantize", f"{precision}, {len(excluded)} linears kept in fp32")
            final = staging / "model"
            final.mkdir()
            excluded_nodes = quantize_export(fp32_path, final / fp32_path.name, precision, session.anatomy,
                                             excluded, staging / "prepared")
            shutil.rmtree(staging / "prepared", ignore_errors=True)
            for extra in fp32_path.parent.iterdir():
                if extra.suffix != ".onnx" and not extra.name.endswith(".onnx_data"):
                    shutil.copy2(extra, final / extra.name)
        control.checkpoint()
        yield from steps.enter_all("validate", f"against the torch model on {data.eval_tokens} tokens")
        from modeldoctor.checkup.run import _decoding_prompts

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
                              excluded_nodes, figures, fp32, message, notes, predicted_by=predictor,
                              predicted_kl=remaining_kl(session, kl, excluded) if predictor else None,
                              missing_checkup=missing,
                              predicted_bytes=predicted_size(session, precision, excluded).bytes)
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
            "passed": result.passed, "notes": result.notes, "predicted_by": result.predicted_by,
            "predicted_kl": result.predicted_kl, "missing_checkup": result.missing_checkup}
    if report is not None:
        from modeldoctor.checkup.diagnosis import diagnose

        card["model"] = report.model
        card["diagnosis"] = [asdict(f) for f in diagnose(report)]
    (folder / "modeldoctor.json").write_text(json.dumps(card, indent=1), encoding="utf-8")
