"""Save a treated model as a new safetensors folder; the user's own model files are never written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from modeldoctor.atomic import prepare_target, replace_folder, staging_folder
from modeldoctor.errors import ModelDoctorError

TREATMENT_CARD = "modeldoctor-treatment.json"


def save_treated_model(session, folder, overwrite: bool = False) -> Path:
    """Write weights (safetensors), config, tokenizer and the treatment card; atomically."""
    target = Path(folder).expanduser().resolve()
    source = Path(session.loaded.path).expanduser().resolve()
    source_folder = source if source.is_dir() else source.parent
    if target == source_folder or source_folder in target.parents or target in source_folder.parents:
        raise ModelDoctorError(f"{target} is inside or around the model you opened; choose a new folder so "
                               "your model files stay untouched.")
    prepare_target(target, overwrite, int(session.summary.memory_bytes * 1.5))
    staging = staging_folder(target)
    try:
        staging.mkdir()
        session.model.save_pretrained(staging, safe_serialization=True)
        session.tokenizer.save_pretrained(staging)
        card = {"treated_from": str(source), **session.treatment.as_dict()}
        (staging / TREATMENT_CARD).write_text(json.dumps(card, indent=1), encoding="utf-8")
        replace_folder(staging, target)
    except OSError as exc:
        raise ModelDoctorError(f"Could not write {target}: {exc.strerror or exc}.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_treatment_card(folder: Path) -> dict | None:
    """The choices a saved treated model carries (kept linears, temperature, recovery prompts)."""
    path = Path(folder) / TREATMENT_CARD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
