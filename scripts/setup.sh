#!/usr/bin/env bash
# Installs everything sdcompress needs on a fresh Debian 12 (cpp-kernels) machine
# and configures the build tree. Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

APT_PACKAGES=(build-essential cmake ninja-build ccache pkg-config python3-venv
  libabsl-dev nlohmann-json3-dev libpng-dev libjpeg-dev zlib1g-dev libicu-dev libgtest-dev libgmock-dev
  libyaml-cpp-dev libsqlite3-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libgloo-dev libcpp-httplib-dev prometheus libonnx-dev chromium chromium-driver)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

# Python venv: LibTorch (from the torch wheel) and the reference implementations.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
stamp=.venv/.requirements.sha
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages (first run downloads about 4 GB for torch + CUDA libs)"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
  # Only for the CLIP BPE vocabulary file it ships; its dependencies are not needed.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
  echo "$want" > "$stamp"
fi

TORCH_PREFIX=$(.venv/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
BUILD=${BUILD_DIR:-build}
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
    -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" >/dev/null
fi
