#!/usr/bin/env bash
# Builds the browser demo into web/dist: the engine as wasm (release), its JS bindings, the page,
# and the bundled model's files with a manifest of sizes and SHA-256 hashes.
# Needs: rustup target wasm32-unknown-unknown, and wasm-bindgen-cli at Cargo.lock's version
# (installed here when missing). wasm-opt (binaryen) is used when present.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${MODEL:-assets/models/shapes-base}"
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
{
  printf '{\n  "model": "%s",\n  "files": [\n' "$(basename "$MODEL")"
  for i in "${!files[@]}"; do
    f=${files[$i]}
    mkdir -p "$OUT/model/$(dirname "$f")"
    cp "$MODEL/$f" "$OUT/model/$f"
    size=$(stat -c %s "$MODEL/$f")
    hash=$(sha256sum "$MODEL/$f" | cut -d' ' -f1)
    sep=$([ "$i" -lt $((${#files[@]} - 1)) ] && echo , || true)
    printf '    {"name": "%s", "size": %s, "sha256": "%s"}%s\n' "$f" "$size" "$hash" "$sep"
  done
  printf '  ]\n}\n'
} > "$OUT/manifest.json"

wasm="$OUT/pkg/portaflow_web_bg.wasm"
echo "built $OUT: wasm $(stat -c %s "$wasm") bytes raw, $(gzip -9 -c "$wasm" | wc -c) gzipped"
