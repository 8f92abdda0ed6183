#!/usr/bin/env bash
# The same-budget comparison of RESULTS.md: trains every config in configs/compare (or the ones
# named) one after another on the CPU, each for its run.budget_minutes of training time, then
# prints one markdown table row per run from its eval.jsonl (the first line is the base model,
# the last the trained adapter, both on the same held-out images). Rerunning resumes or skips
# finished runs.
#   scripts/compare.sh [NAME ...]        e.g. scripts/compare.sh fast boxflow
# Needs: a release build (cargo build --release -p portaflow), jq; DRaFT-LV needs runs/clip
# (portaflow --device cpu train clip --out runs/clip).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/portaflow}
OUT=${OUT:-runs/compare}
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for f in configs/compare/*.toml; do names+=("$(basename "$f" .toml)"); done
fi
mkdir -p "$OUT"

for name in "${names[@]}"; do
  config="configs/compare/$name.toml"
  [ -f "$config" ] || { echo "compare.sh: no $config" >&2; exit 1; }
  if [ -d "$OUT/$name/adapter_final" ]; then
    echo "compare.sh: $name is done ($OUT/$name)"
    continue
  fi
  "$BIN" --device cpu train grpo --config "$config" --out "$OUT/$name" | tee -a "$OUT/$name.log"
done

echo
echo "| method | epochs | training s | held-out strict: base → trained | dense mean | artifacts / image |"
echo "| --- | ---: | ---: | --- | --- | --- |"
for name in "${names[@]}"; do
  eval_log="$OUT/$name/eval.jsonl"
  state="$OUT/$name/checkpoint/state.json"
  [ -f "$eval_log" ] && [ -f "$state" ] || continue
  jq -rs --arg name "$name" --slurpfile state "$state" '
    # x with d decimals, trailing zeros kept
    def fixed(d): (. * pow(10; d) | round | tostring) as $s
      | if d == 0 then $s
        else ("0" * ([d + 1 - ($s | length), 0] | max) + $s) as $p
          | $p[:-d] + "." + $p[-d:] end;
    (.[0]) as $a | (.[-1]) as $b |
    "| \($name) | \($b.epoch) | \($state[0].trained_seconds | floor) | " +
    "\($a.accuracy * 100 | fixed(1))% → \($b.accuracy * 100 | fixed(1))% | " +
    "\($a.dense_mean | fixed(3)) → \($b.dense_mean | fixed(3)) | " +
    "\($a.artifact_rate | fixed(2)) → \($b.artifact_rate | fixed(2)) |"' "$eval_log"
done
