"""Folders written atomically: built in a hidden staging folder beside the target, renamed
into place only when complete. A cancelled, failed or killed write leaves no target behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from modeldoctor.errors import ModelDoctorError, ResourceError


def staging_folder(target: Path) -> Path:
    """A hidden folder beside the target, named after this process (so a killed run's is found)."""
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def prepare_target(target: Path, overwrite: bool, needed_bytes: int) -> None:
    """Refuse an existing target unless allowed, check free space, clear a killed run's staging."""
    if target.exists() and not overwrite:
        raise ModelDoctorError(f"{target} already exists; choose another folder or allow replacing it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < needed_bytes:
        raise ResourceError(f"Writing needs about {needed_bytes / 1e9:.1f} GB free in {target.parent}; "
                            f"only {free / 1e9:.1f} GB is free.")
    remove_stale_staging(target)


def remove_stale_staging(target: Path) -> None:
    """Folders left by a write that was killed (its process is gone)."""
    for folder in target.parent.glob(f".{target.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        alive = pid.isdigit() and int(pid) != os.getpid() and Path(f"/proc/{pid}").exists()
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


def replace_folder(built: Path, target: Path) -> None:
    """Rename the finished folder into place; an old target is removed only after that."""
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, backup)
    os.replace(built, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
