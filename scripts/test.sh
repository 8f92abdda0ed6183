#!/usr/bin/env bash
# The test command: installs/finds the software Vulkan adapter, runs every workspace test, and
# checks that the browser crate still compiles for wasm32.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/ensure-vulkan.sh
# Tests run on lavapipe with a small autotune budget; cubecl keeps its calibration and autotune
# results in target/environment/ (burn/persistence), so only the first process pays for them.
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"

cargo test --workspace "$@"

if rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown \
   || rustup target add wasm32-unknown-unknown; then
  cargo check -p portaflow-web --target wasm32-unknown-unknown
else
  echo "test.sh: cannot add the wasm32-unknown-unknown target; browser build not checked" >&2
  exit 1
fi
