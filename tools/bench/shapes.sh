#!/usr/bin/env bash
# End-to-end benchmark of the bundled Shapes model against PyTorch on the same weights: sampling
# (4 and 20 steps, batch 1 and 16, CFG 4) and Flow-GRPO iterations of configs/grpo-shapes.toml, on
# PyTorch CPU (2 threads and 1 thread), burn Flex and Vulkan (2 timed runs); then the
# scaling table. Rewrites the "Bundled model end to end" section of BENCHMARKS.md.
#
# Run on an otherwise idle machine:  RUNS=5 tools/bench/shapes.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS="${RUNS:-5}"
PYTHON="${PYTHON:-/work/venv/bin/python}"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"

# Release: what `cargo run --release` users get (the dev profile builds portaflow at opt-level 1,
# which leaves the fused CPU activations unvectorised).
cargo build --release -p portaflow --quiet
out=target/bench/shapes   # the JSON reports stay here; write_shapes_bench.py can be rerun on them
mkdir -p "$out"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" tools/bench/shapes_torch.py --runs "$RUNS" --warmup 1 --threads 2 --grpo > "$out/torch2.json"
"$PYTHON" tools/bench/shapes_torch.py --runs "$RUNS" --warmup 1 --threads 1 --grpo > "$out/torch1.json"
target/release/portaflow --device cpu bench --runs "$RUNS" --warmup 1 \
    --grpo configs/grpo-shapes.toml --scaling --json "$out/flex.json"
target/release/portaflow --device vulkan bench --runs 2 --warmup 1 \
    --grpo configs/grpo-shapes.toml --json "$out/vulkan.json"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" tools/bench/write_shapes_bench.py "$out" "RUNS=$RUNS tools/bench/shapes.sh" \
    "$load_before" "$load_after"
echo "updated BENCHMARKS.md"
