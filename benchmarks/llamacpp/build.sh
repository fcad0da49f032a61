#!/usr/bin/env bash
# Build llama.cpp's llama-quantize, llama-imatrix and llama-perplexity once, outside the
# repository (LLAMACPP_HOME, default ~/.cache/compensator-llamacpp), from the llama.cpp that
# the pinned llama-cpp-python source distribution vendors (PyPI is reachable here; GitHub is
# not). CPU only, native instructions, static. 3 min on 2 cores here; a second call is a no-op.
# CI does not run this; benchmarks/llamacpp/ppl.py uses it.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
HOME_DIR=${LLAMACPP_HOME:-$HOME/.cache/compensator-llamacpp}
SRC="$HOME_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$HOME_DIR/build/bin"
TOOLS=(llama-quantize llama-imatrix llama-perplexity)
mkdir -p "$HOME_DIR"
if [ -x "$BIN/llama-perplexity" ] && [ -x "$BIN/llama-imatrix" ] && [ -x "$BIN/llama-quantize" ]; then
  echo "ready: $BIN"; exit 0
fi
if [ ! -d "$SRC" ]; then
  python3 -m pip download -q "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$HOME_DIR"
  tar -xzf "$HOME_DIR/llama_cpp_python-$VERSION.tar.gz" -C "$HOME_DIR"
fi
cmake -S "$SRC" -B "$HOME_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
cmake --build "$HOME_DIR/build" --target "${TOOLS[@]}" -j "${JOBS:-2}"
echo "llama-cpp-python $VERSION" > "$HOME_DIR/build/VERSION"
echo "ready: $BIN"
