"""Export the session's model (as it is in memory, treatments included) through optimum-onnx."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

ONNX_FILE = "model.onnx"
EXPORT_TASK = "text-generation-with-past"


def export_refusal(model, kind: str = "transformer") -> str | None:
    """Why optimum-onnx cannot export this model's architecture, said before any work is done
    (its own error comes deep inside the export); None when it can. `kind` is the anatomy's
    (transformer, state-space, hybrid), for the message. State-space and hybrid models
    (Mamba, Mamba2, FalconMamba, Bamba, Jamba) have no ONNX exporter in optimum-onnx."""
    from optimum.exporters.onnx import model_configs  # noqa: F401  (registers the exporters)
    from optimum.exporters.tasks import TasksManager

    model_type = str(getattr(model.config, "model_type", ""))
    for name in dict.fromkeys((model_type, model_type.replace("_", "-"))):
        try:
            if EXPORT_TASK in TasksManager.get_supported_tasks_for_model_type(name, "onnx",
                                                                              library_name="transformers"):
                return None
        except KeyError:
            continue
    what = {"state-space": "a state-space (Mamba) model", "hybrid": "a hybrid attention + state-space model"}
    return (f"ONNX export is not available for {what.get(kind, 'this architecture')} ('{model_type}'): "
            "optimum-onnx has no exporter for it. The checkup, diagnosis and treatments work on it; "
            "only the export does not.")


def export_fp32(model, tokenizer, folder: str | Path, with_past: bool = True) -> Path:
    """Write a decoder ONNX model (with past key values by default) plus tokenizer and configs.
    Returns the .onnx path. The folder must not exist yet or be empty."""
    from optimum.exporters.onnx.convert import onnx_export_from_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = EXPORT_TASK if with_past else "text-generation"
    # optimum and the TorchScript exporter print pages of tracer warnings; the engine reports
    # what matters (validation figures) itself.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.getLogger("optimum").level
        logging.getLogger("optimum").setLevel(logging.ERROR)
        try:
            onnx_export_from_model(model, folder, task=task, do_validation=False, preprocessors=[tokenizer])
        finally:
            logging.getLogger("optimum").setLevel(previous)
    return folder / ONNX_FILE
