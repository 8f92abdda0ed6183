#!/usr/bin/env bash
# Builds the browser demo into web/dist: the engine as wasm (release), its JS bindings, the page,
# and the bundled model's files with a manifest of sizes and SHA-256 hashes.
# Needs: rustup target wasm32-unknown-unknown, and wasm-bindgen-cli at Cargo.lock's version
# (installed here when missing). wasm-opt (binaryen) is used when present.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${MODEL:-assets/models/shapes-base}"
# The few-step student (a PEFT adapter on MODEL), served as model/student/; STUDENT= ships none.
STUDENT="${STUDENT-assets/models/shapes-4nfe}"
OUT=web/dist
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
if ! wasm-bindgen --version 2>/dev/null | grep -q " $version\$"; then
  echo "installing wasm-bindgen-cli $version (Cargo.lock's wasm-bindgen)"
  cargo install wasm-bindgen-cli --version "$version"
fi
rustup target list --installed | grep -q wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

cargo build -p portaflow-web --target wasm32-unknown-unknown --release
rm -rf "$OUT" && mkdir -p "$OUT/pkg" "$OUT/model"
wasm-bindgen --target web --no-typescript --out-dir "$OUT/pkg" \
  target/wasm32-unknown-unknown/release/portaflow_web.wasm
if command -v wasm-opt >/dev/null; then
  wasm-opt -O3 --enable-bulk-memory --enable-nontrapping-float-to-int \
    "$OUT/pkg/portaflow_web_bg.wasm" -o "$OUT/pkg/portaflow_web_bg.wasm"
fi
cp web/www/* "$OUT/"

files=(model_index.json scheduler/scheduler_config.json tokenizer/tokenizer.json
       text_encoder/config.json text_encoder/model.safetensors
       transformer/config.json transformer/diffusion_pytorch_model.safetensors)
# a latent Shapes model also ships its autoencoder
if [ -d "$MODEL/vae" ]; then files+=(vae/config.json vae/diffusion_pytorch_model.safetensors); fi
sources=()
for f in "${files[@]}"; do sources+=("$MODEL/$f"); done
if [ -n "$STUDENT" ]; then
  [ -f "$STUDENT/adapter_model.safetensors" ] || { echo "no student adapter in $STUDENT (STUDENT= builds without one)" >&2; exit 1; }
  for f in adapter_config.json adapter_model.safetensors sampling.json; do
    # sampling.json (how the student samples) is optional: without it, RTDMD's 4 CPS steps
    [ -f "$STUDENT/$f" ] || [ "$f" = sampling.json ] || { echo "missing $STUDENT/$f" >&2; exit 1; }
    [ -f "$STUDENT/$f" ] || continue
    files+=("student/$f")
    sources+=("$STUDENT/$f")
  done
fi
{
  printf '{\n  "model": "%s",\n  "files": [\n' "$(basename "$MODEL")"
  for i in "${!files[@]}"; do
    f=${files[$i]}
    src=${sources[$i]}
    mkdir -p "$OUT/model/$(dirname "$f")"
    cp "$src" "$OUT/model/$f"
    size=$(stat -c %s "$src")
    hash=$(sha256sum "$src" | cut -d' ' -f1)
    sep=$([ "$i" -lt $((${#files[@]} - 1)) ] && echo , || true)
    printf '    {"name": "%s", "size": %s, "sha256": "%s"}%s\n' "$f" "$size" "$hash" "$sep"
  done
  printf '  ]\n}\n'
} > "$OUT/manifest.json"

wasm="$OUT/pkg/portaflow_web_bg.wasm"
echo "built $OUT: wasm $(stat -c %s "$wasm") bytes raw, $(gzip -9 -c "$wasm" | wc -c) gzipped"
