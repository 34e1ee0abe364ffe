#!/usr/bin/env bash
# Adds Model Doctor to the desktop's application menu (Linux, freedesktop.org).
set -euo pipefail
cd "$(dirname "$0")/.."
apps=${XDG_DATA_HOME:-$HOME/.local/share}/applications
icons=${XDG_DATA_HOME:-$HOME/.local/share}/icons/hicolor/scalable/apps
mkdir -p "$apps" "$icons"
cp resources/icons/modeldoctor.svg "$icons/modeldoctor.svg"
sed "s|^Exec=modeldoctor|Exec=$(pwd)/.venv/bin/modeldoctor|" packaging/modeldoctor.desktop > "$apps/modeldoctor.desktop"
echo "Installed $apps/modeldoctor.desktop"
