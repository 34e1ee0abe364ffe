#!/usr/bin/env bash
# One command on a fresh machine: install, fetch the sample model, open the app on it.
# Without a display (a server, CI) it runs the command-line checkup of the sample instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/modeldoctor sample
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] || [ "$(uname)" = "Darwin" ]; then
  exec .venv/bin/modeldoctor app sample
fi
echo "No display found: running the command-line checkup of the sample model instead."
exec .venv/bin/modeldoctor checkup sample --out checkup-results "$@"
