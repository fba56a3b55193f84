#!/usr/bin/env bash
# LoRA Studio launcher for macOS: double-click it in Finder (the first start installs, later starts are quick).
cd "$(dirname "$0")"
exec bash ./start.sh "$@"
