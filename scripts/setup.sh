#!/usr/bin/env bash
# Create ./.venv with the project and its test tools. Safe to rerun.
# torch goes in first, pinned: on the CPU machines this project is developed on, torch==2.13.0 is a
# local CPU build; letting another package pull "torch" would fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip --upgrade pip
pip "torch==${TORCH_VERSION:-2.13.0}"
pip -e ".[test]"
.venv/bin/python -c "import torch, transformer_lens, ray, boto3, moto, pyarrow, triton; print('setup ok: torch', torch.__version__, '| ray', ray.__version__)"
