#!/usr/bin/env bash
# Forward time of each tiny golden model: ours (Flex CPU and Vulkan) vs diffusers on PyTorch CPU,
# same weights and inputs (assets/golden/), plus the Flow-SDE sampler step (tensor ops vs the
# fused WGSL kernel). Writes BENCHMARKS.md at the repository root.
#
# Run:  tools/bench/forward.sh            (RUNS=50 by default; RUNS=20 tools/bench/forward.sh)
#
# The Rust side is built with the same profile and features as `cargo test --workspace` (a
# workspace-wide build shares its artifacts; `--release` or `-p portaflow` would rebuild burn).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS="${RUNS:-50}"
PYTHON="${PYTHON:-/work/venv/bin/python}"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"

cargo build --workspace --examples --quiet
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
TORCH_THREADS=2 "$PYTHON" tools/bench/forward.py --runs "$RUNS" > "$out/torch2.json"
TORCH_THREADS=1 "$PYTHON" tools/bench/forward.py --runs "$RUNS" > "$out/torch1.json"
target/debug/examples/bench_forward --runs "$RUNS" > "$out/ours.json"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" tools/bench/write_benchmarks.py "$out/torch2.json" "$out/torch1.json" "$out/ours.json" \
    "RUNS=$RUNS tools/bench/forward.sh" "$load_before" "$load_after" > BENCHMARKS.md
echo "wrote BENCHMARKS.md"
