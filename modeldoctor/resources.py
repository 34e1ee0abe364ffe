"""Where the files in the top-level resources/ folder live."""

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def resource(*parts: str) -> Path:
    path = RESOURCES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"Model Doctor's resource {path} is missing; reinstall the package.")
    return path
