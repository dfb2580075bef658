#!/usr/bin/env bash
# Make the Optimum fixtures beside this script in a pinned virtual environment OUTSIDE the repository
# (never the project's .venv). Usage: tests/corpus/optimum/make_fixtures.sh [make_fixtures.py args]
#   OPTIMUM_VENV=/work/.venvs/optimum (default)   PYTHON=python3.11 (the interpreter that makes the venv)
# torch==2.13.0 resolves to the CPU wheel here; never install an unpinned torch (a multi-GB CUDA build).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${OPTIMUM_VENV:-/work/.venvs/optimum}"
if [ ! -x "$venv/bin/optimum-cli" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$venv/bin/python" "$here/make_fixtures.py" "$@"
