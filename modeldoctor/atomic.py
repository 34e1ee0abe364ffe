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


STALE_AFTER_S = 24 * 3600  # on Windows, where a process is not looked up, a day-old staging folder is stale


def _writer_alive(folder: Path) -> bool:
    import time

    pid = folder.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False  # this process runs one write at a time: an own leftover is stale
    if Path("/proc").is_dir():
        return Path(f"/proc/{pid}").exists()
    if os.name == "posix":  # macOS and the BSDs: signal 0 asks whether the process exists
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:  # Windows (os.kill would end the process): a folder older than a day is stale
        return time.time() - folder.stat().st_mtime < STALE_AFTER_S
    except OSError:
        return False


def remove_stale_staging(target: Path) -> None:
    """Folders left in the target's folder by killed writes, whatever target they were for (a
    staging folder or an old copy whose process is gone); a live write's folders are left alone."""
    for pattern in (".*.partial-*", ".*.old-*"):
        for folder in target.parent.glob(pattern):
            if folder.is_dir() and not _writer_alive(folder):
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
