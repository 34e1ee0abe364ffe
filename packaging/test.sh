#!/usr/bin/env bash
# One command on a fresh machine: install, fetch the sample model, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/install.sh
export HF_HUB_OFFLINE=1 QT_QPA_PLATFORM=offscreen
.venv/bin/modeldoctor sample >/dev/null
exec .venv/bin/python -m pytest -q "$@"
