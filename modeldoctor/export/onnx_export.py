"""Export the session's model (as it is in memory, treatments included) through optimum-onnx."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

ONNX_FILE = "model.onnx"


def export_fp32(model, tokenizer, folder: str | Path, with_past: bool = True) -> Path:
    """Write a decoder ONNX model (with past key values by default) plus tokenizer and configs.
    Returns the .onnx path. The folder must not exist yet or be empty."""
    from optimum.exporters.onnx.convert import onnx_export_from_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = "text-generation-with-past" if with_past else "text-generation"
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
