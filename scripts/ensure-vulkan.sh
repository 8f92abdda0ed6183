#!/usr/bin/env bash
# Makes sure a Vulkan driver is present. On a machine without a GPU driver this installs Mesa's
# software Vulkan adapter (lavapipe, Debian/Ubuntu package `mesa-vulkan-drivers`).
# Sourced by scripts/test.sh and scripts/portaflow; safe to run repeatedly.
set -euo pipefail

have_vulkan_icd() {
  local dir
  for dir in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
    compgen -G "$dir/*.json" >/dev/null && return 0
  done
  return 1
}

if have_vulkan_icd && ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
  exit 0
fi

echo "portaflow: no Vulkan driver found; installing Mesa lavapipe (mesa-vulkan-drivers)..." >&2
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
else
  echo "portaflow: not root and no sudo: install mesa-vulkan-drivers yourself (or use --device cpu)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "portaflow: no apt-get: install your distribution's Mesa Vulkan drivers (lavapipe)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null
have_vulkan_icd || { echo "portaflow: mesa-vulkan-drivers installed but no Vulkan ICD file found" >&2; exit 1; }
