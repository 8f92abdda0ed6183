"""Formats the two JSON reports of tools/bench/forward.sh as BENCHMARKS.md (printed on stdout).

Usage: write_benchmarks.py TORCH2_JSON TORCH1_JSON OURS_JSON COMMAND LOAD_BEFORE LOAD_AFTER
(TORCH2 / TORCH1: forward.py with 2 threads and with 1 thread)
"""

from __future__ import annotations

import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def lscpu(field: str) -> str:
    for line in sh("lscpu").splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def locked(name: str) -> str:
    text = (ROOT / "Cargo.lock").read_text()
    found = re.search(rf'name = "{re.escape(name)}"\nversion = "([^"]+)"', text)
    return found.group(1) if found else "?"


def main() -> None:
    torch, torch1, ours = (json.loads(Path(p).read_text()) for p in sys.argv[1:4])
    command, load_before, load_after = sys.argv[4:7]
    devices = ours["devices"]
    flex, vulkan = devices.get("flex"), devices.get("vulkan")
    out = []
    w = out.append
    w("# Benchmarks\n")
    w("Made by one command, which builds the Rust side, runs both sides and writes this file:\n")
    w(f"```sh\n{command}\n```\n")
    w("## Machine\n")
    w(f"- CPU: {lscpu('Model name')}, `nproc` = {sh('nproc')} "
      f"({lscpu('Thread(s) per core')} thread per core), {lscpu('Hypervisor vendor')} guest")
    w(f"- OS: {platform.system()} {platform.release()}")
    if vulkan:
        w(f"- Vulkan adapter: {vulkan['device']}")
    w(f"- Rust: {sh('rustc', '--version')}; burn {locked('burn')}, cubecl {locked('cubecl')}, "
      f"wgpu {locked('wgpu')}; profile `dev` as `cargo test --workspace` builds it "
      "(our crates opt-level 1, dependencies opt-level 3)")
    w(f"- Python: torch {torch['torch']}, diffusers {torch['diffusers']}, no_grad, f32; "
      f"`torch.set_num_threads({torch['threads']})` and, as a second column, "
      f"`torch.set_num_threads({torch1['threads']})`")
    w(f"- Load average (1, 5, 15 min) before / after the run: {load_before} / {load_after}. The "
      "machine is shared: a load above 1 means other work held a core, which hurts PyTorch's "
      "2-thread OpenMP barriers most (a thread waits for its descheduled partner at every op), "
      "hence the 1-thread column.")
    w(f"- Method: each side loads the same fixture (`assets/golden/<name>`), runs "
      f"{torch['warmup']} (PyTorch) / {ours['warmup']} (ours) warm-up forwards, then reports the "
      f"median of {torch['runs']} / {ours['runs']} timed forwards. Ours times until the output "
      "is back on the host (`into_data`). The VAE rows are the raw decoder on the VAE-space latent "
      "(`vae.decode`, post-quant conv included).\n")
    w("## Forward time of the tiny models (ms, median)\n")
    t2, t1 = torch["threads"], torch1["threads"]
    head = (f"| model | PyTorch CPU {t2} thr | PyTorch CPU {t1} thr | ours Flex CPU "
            f"| Flex / PyTorch {t2} thr | Flex / PyTorch {t1} thr |")
    rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
    if vulkan:
        head += f" ours Vulkan | Vulkan / PyTorch {t2} thr | Vulkan / PyTorch {t1} thr |"
        rule += " ---: | ---: | ---: |"
    w(head)
    w(rule)
    for name, ref in torch["models"].items():
        ref1 = torch1["models"][name]
        row = f"| {name} | {ref:.3f} | {ref1:.3f} |"
        for dev in (flex, vulkan):
            if dev is None:
                continue
            ms = dev["models"][name]
            row += f" {ms:.3f} | {ms / ref:.2f} | {ms / ref1:.2f} |"
        w(row)
    w("\nA ratio above 1 means ours is slower. These models are tiny (widths 32, 8×12 latents), so "
      "the numbers measure per-op overhead (dispatch, allocation, and on Vulkan a kernel launch "
      "for each of a few hundred small ops, which lavapipe pays on the same two busy cores), not "
      "arithmetic throughput.\n")
    w("## Flow-SDE sampler step (ms, median): tensor ops vs the fused WGSL kernel\n")
    w("One Flow-GRPO SDE step (x, v, noise → x', mean, per-sample log-prob), synchronised with "
      "the device (`device.sync()`). The kernel runs one workgroup per sample: it saves launches "
      "(faster on small latents, where launch cost dominates) but leaves lavapipe's threads idle "
      "on large ones. So `sample()` (`core/src/sample/pipeline.rs`) uses it on wgpu devices for "
      "latents of at most 32,768 values in all (`FUSED_SDE_MAX_ELEMENTS`, the largest size "
      "measured faster here), and tensor ops otherwise, on Flex and under autodiff.\n")
    w("| latent | Flex tensor ops | Vulkan tensor ops | Vulkan fused kernel | fused / tensor on Vulkan |")
    w("| --- | ---: | ---: | ---: | ---: |")
    by_size = sorted((vulkan or flex)["flow_sde_step"], key=lambda s: math.prod(json.loads(s)))
    for shape in by_size:
        f = flex["flow_sde_step"][shape]["tensor"] if flex else float("nan")
        v = vulkan["flow_sde_step"][shape] if vulkan else {"tensor": float("nan"), "fused": float("nan")}
        w(f"| {shape} | {f:.3f} | {v['tensor']:.3f} | {v['fused']:.3f} | {v['fused'] / v['tensor']:.2f} |")
    w("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
