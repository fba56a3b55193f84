#!/usr/bin/env bash
# LoRA Studio launcher for Linux: double-click it (or run ./start.sh).
# The first start creates a Python environment in .venv and installs what the app needs;
# later starts open the app at once. Arguments go to launch.py (e.g. ./start.sh --no-browser).
# LORA_STUDIO_VENV=/path/to/venv uses another environment: one that exists is used as it is (never
# installed into; it must hold the packages already), one that does not is created there.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LORA_STUDIO_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.lora-studio-requirements"

if [ -n "${LORA_STUDIO_VENV:-}" ] && [ -x "$VENV/bin/python" ] && [ ! -f "$STAMP" ]; then
  # An environment you named and made yourself: used as it is, never installed into.
  if ! "$VENV/bin/python" -c 'import gradio, torch, diffusers, peft' 2>/dev/null; then
    echo "error: the environment LORA_STUDIO_VENV names ($VENV) lacks the app's packages; install them into" \
         "it (\"$VENV/bin/python\" -m pip install -r requirements.txt) or unset LORA_STUDIO_VENV to let the" \
         "app make its own in .venv" >&2
    exit 1
  fi
  exec "$VENV/bin/python" launch.py "$@"
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    found="$("$PYTHON" --version 2>&1 || echo "no $PYTHON")"
    echo "error: LoRA Studio needs Python 3.11 or newer, and $PYTHON is ${found#Python }; install Python 3.11+" \
         "(or point PYTHON at one: PYTHON=python3.12 ./start.sh) and start again" >&2
    exit 1
  fi
  echo "LoRA Studio: first start. Creating a Python environment in $VENV ..."
  if ! "$PYTHON" -m venv "$VENV"; then
    echo "error: could not create a virtual environment with $PYTHON; install Python 3.11+ with venv" \
         "(Debian/Ubuntu: sudo apt install python3-venv) and start again" >&2
    exit 1
  fi
fi
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  echo "LoRA Studio: installing the packages it needs (torch, diffusers, gradio, ...)."
  echo "This takes a few minutes the first time; progress follows."
  if ! "$VENV/bin/python" -m pip install --progress-bar on -r requirements.txt; then
    echo "error: installing requirements.txt failed (see the lines above); check your internet connection" \
         "and free disk space, then start again" >&2
    exit 1
  fi
  echo "$want" > "$STAMP"
fi
exec "$VENV/bin/python" launch.py "$@"
