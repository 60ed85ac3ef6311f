#!/usr/bin/env bash
# clang-tidy over the project's own sources. GCC's precompiled header cannot be read
# by clang, so the PCH flags are dropped from a copy of compile_commands.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD=${BUILD_DIR:-build}
mkdir -p "$BUILD/tidy"
.venv/bin/python - "$BUILD" <<'PY'
import json, re, sys
b = sys.argv[1]
cmds = json.load(open(f"{b}/compile_commands.json"))
for c in cmds:
    c["command"] = re.sub(r"-include \S+cmake_pch\.hxx|-Winvalid-pch", "", c["command"])
json.dump([c for c in cmds if "/proto/gen/" not in c["file"]], open(f"{b}/tidy/compile_commands.json", "w"))
PY
files=$(git ls-files '*.cc' | grep -E '^(sd|stages|cli|common|coordinator|worker|serve|bench|tests/cpp|tests/tools)/')
clang-tidy -p "$BUILD/tidy" --quiet "$@" $files 2>&1 | grep -E "^/.*(warning|error):" | grep -v "/usr/\|torch/include" || true
