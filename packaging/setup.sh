#!/usr/bin/env bash
# One command on a fresh machine: install, fetch the sample model, run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/modeldoctor sample
.venv/bin/modeldoctor checkup sample --out checkup-results "$@"
