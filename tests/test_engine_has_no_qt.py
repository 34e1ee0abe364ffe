import subprocess
import sys
from pathlib import Path

import modeldoctor


def test_engine_imports_no_qt():
    root = Path(modeldoctor.__file__).parent
    modules = sorted(
        "modeldoctor." + ".".join(p.relative_to(root).with_suffix("").parts)
        for p in root.rglob("*.py") if "gui" not in p.parts and p.name != "__main__.py"
    )
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name.removesuffix('.__init__'))\n"
            "leaks = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'superqt', 'qtpy')]\n"
            "assert not leaks, leaks\n"
            "print(len(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
