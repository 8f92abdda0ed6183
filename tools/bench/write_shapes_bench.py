"""Writes the "Bundled model end to end" section of BENCHMARKS.md from tools/bench/shapes.sh's
JSON reports (torch2.json, torch1.json, flex.json, vulkan.json in one folder), replacing the
section if it is there and appending it otherwise.

Usage: write_shapes_bench.py DIR COMMAND LOAD_BEFORE LOAD_AFTER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START = "<!-- shapes-bench:start -->"
END = "<!-- shapes-bench:end -->"


def load(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def by_setting(report: dict) -> dict:
    return {(r["steps"], r["batch"]): r for r in report.get("sampling", [])}


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs > 0 else "—"


def roofline(t2: dict, t1: dict, f: dict, a: dict, v: dict) -> list[str]:
    """The same matmul FLOPs (ours, analytic) over each side's time, against this machine's
    sgemm peak as PyTorch measures it."""
    peak = t2.get("sgemm_gflops")
    if not peak:
        return []
    best = max(f.values(), key=lambda r: r["gflops"])
    key = (best["steps"], best["batch"])
    work = best["gflops"] * best["median_seconds"]
    torch_rate = work / a[key]["median_seconds"] if key in a else float("nan")
    vulkan = max((r["gflops"] for r in v.values()), default=0.0)
    return [
        f"Roofline: this machine's f32 peak, as a 2048³ sgemm in PyTorch, is {peak:.0f} GFLOP/s "
        f"with 2 threads ({t1.get('sgemm_gflops', 0):.0f} with 1). At {key[0]} steps, batch "
        f"{key[1]} the transformer's matmuls run at {best['gflops']:.1f} GFLOP/s on Flex "
        f"({100 * best['gflops'] / peak:.0f}% of that peak) and {torch_rate:.1f} GFLOP/s in "
        f"PyTorch ({100 * torch_rate / peak:.0f}%). The Vulkan path on lavapipe reaches "
        f"{vulkan:.2f} GFLOP/s: per-kernel dispatch on a software driver sharing the two cores "
        "dominates at this size.",
    ]


def section(folder: Path, command: str, before: str, after: str) -> str:
    t2, t1 = load(folder, "torch2.json"), load(folder, "torch1.json")
    flex, vk = load(folder, "flex.json"), load(folder, "vulkan.json")
    lines = [
        START,
        "## Bundled model end to end: sampling and a GRPO iteration (ours vs PyTorch, same weights)",
        "",
        f"Made by `{command}` (the PyTorch side is `tools/bench/shapes_torch.py`: diffusers "
        f"{t2.get('diffusers', '?')}, torch {t2.get('torch', '?')}, peft; images equal ours within "
        "1 level of 255). Model: the bundled `assets/models/shapes-base` "
        f"({flex['parameters']:,} transformer parameters, {flex['image_tokens']} image tokens + "
        f"{flex['text_tokens']} text tokens), f32, CFG {flex['cfg']}; ours on `{flex['device']}` "
        f"and `{vk['device']}`. Median of {flex['runs']} runs after 1 warm-up; a generate call "
        "includes text encoding, the autoencoder's decode and the copy of 8-bit images to the host. "
        "Load average (1, 5, 15 "
        f"min) before / after: {before} / {after}.",
        "",
        "### Sampling: seconds per generate call (images/s)",
        "",
        "| steps | batch | PyTorch 2 thr | PyTorch 1 thr | ours Flex | Flex / PyTorch 2 thr | Flex / PyTorch 1 thr | ours Vulkan (lavapipe) | Flex GFLOP/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    a, b, f, v = by_setting(t2), by_setting(t1), by_setting(flex), by_setting(vk)
    for key in sorted(f):
        cell = lambda r: f"{r['median_seconds']:.3f} ({r['images_per_second']:.1f})" if r else "—"
        ta, tb, ff, vv = a.get(key), b.get(key), f[key], v.get(key)
        lines.append(
            f"| {key[0]} | {key[1]} | {cell(ta)} | {cell(tb)} | {cell(ff)} | "
            f"{ratio(ff['median_seconds'], ta['median_seconds']) if ta else '—'} | "
            f"{ratio(ff['median_seconds'], tb['median_seconds']) if tb else '—'} | {cell(vv)} | "
            f"{ff['gflops']:.1f} |"
        )
    lines += [
        "",
        "A ratio above 1 means ours is slower. Peak resident memory during sampling: "
        f"PyTorch {max(r['peak_memory_mib'] for r in t2['sampling']):.0f} MiB (of which "
        f"{t2.get('rss_mib_before_load', 0):.0f} MiB is the libraries before the model loads), "
        f"ours Flex {max(r['peak_memory_mib'] or 0 for r in flex['sampling']):.0f} MiB.",
        "",
        *roofline(t2, t1, f, a, v),
        "",
        "### One Flow-GRPO iteration of `configs/grpo-shapes.toml` (32 images, 10 steps, window of 3)",
        "",
        "| iteration | PyTorch 2 thr: total / rollout / train (s) | PyTorch 1 thr | ours Flex | Flex / PyTorch 2 thr | Flex / PyTorch 1 thr | ours Vulkan (lavapipe) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    g2 = t2["grpo"]["iterations"]
    g1 = t1["grpo"]["iterations"]
    gv = vk.get("grpo", [])
    for k, ours in enumerate(flex["grpo"]):
        fmt = lambda r: f"{r['seconds']:.2f} / {r['seconds_rollout']:.2f} / {r['seconds_train']:.2f}"
        lines.append(
            f"| {k} | {fmt(g2[k])} | {fmt(g1[k])} | {fmt(ours)} | "
            f"{ratio(ours['seconds'], g2[k]['seconds'])} | {ratio(ours['seconds'], g1[k]['seconds'])} | "
            f"{fmt(gv[k]) if k < len(gv) else '—'} |"
        )
    lines += [
        "",
        "Iteration 0 includes first-use costs (allocator warm-up, and on our side the adapter's "
        "first copy). Ours includes the reward (the Shapes detector, overlapped with sampling); "
        "PyTorch's uses random rewards. Peak memory of a GRPO iteration: PyTorch "
        f"{t2.get('peak_rss_mib', 0):.0f} MiB, ours Flex "
        f"{max(r['peak_memory_mib'] or 0 for r in flex['grpo']):.0f} MiB. Vulkan runs "
        f"{vk['runs']} timed calls per sampling row (lavapipe is slow).",
        "",
        "### Scaling (ours, Flex): one transformer forward of a fresh model, 6 blocks, patch 8",
        "",
        "| varies | image side | image tokens | width | batch | ms | GFLOP/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in flex.get("scaling", []):
        lines.append(
            f"| {r['varies']} | {r['image_side']} | {r['image_tokens']} | {r['width']} | "
            f"{r['batch']} | {r['median_ms']:.1f} | {r['gflops']:.1f} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    folder, command, before, after = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    text = section(folder, command, before, after)
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text()
    if START in current and END in current:
        head, rest = current.split(START, 1)
        tail = rest.split(END, 1)[1]
        current = head + text + tail
    else:
        current = current.rstrip() + "\n\n" + text + "\n"
    path.write_text(current)


if __name__ == "__main__":
    main()
