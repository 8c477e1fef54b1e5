#!/usr/bin/env bash
# One-time set-up, safe to re-run: a venv in .venv with the pinned versions of requirements.lock and
# tap_fast installed editable. Re-installs only when requirements.lock or pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.tap_fast_installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned packages into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.lock
  .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
  echo "$want" > "$stamp"
fi
