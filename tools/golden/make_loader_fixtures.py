"""Loader fixtures: the `sd3_tiny` weights saved the other ways diffusers saves a model.

Reads the committed `assets/golden/sd3_tiny` (so it needs `make_transformer_fixtures.py` to have
run, and regenerates nothing else) and writes:

  sd3_tiny_sharded/  config.json, diffusion_pytorch_model-0000N-of-0000M.safetensors and
                     diffusion_pytorch_model.safetensors.index.json (save_pretrained with a tiny
                     max_shard_size). Same f32 values: the Rust test must reproduce
                     sd3_tiny/io.safetensors:output.
  sd3_tiny_f16/      config.json, diffusion_pytorch_model.safetensors in F16
  sd3_tiny_bf16/     the same in BF16
                     each with io.safetensors:output = diffusers' forward of the *rounded* weights
                     (loaded back with torch_dtype=float32, computed in f32) on the inputs of
                     sd3_tiny/io.safetensors, so a Rust load that casts to f32 matches it as
                     tightly as the f32 fixture does.

Run:  /work/venv/bin/python tools/golden/make_loader_fixtures.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, dir_size, save_io, setup_torch  # noqa: E402

from diffusers import SD3Transformer2DModel  # noqa: E402

SOURCE = "sd3_tiny"
SHARD_SIZE = "100KB"  # sd3_tiny is 363 KB: four shards
INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")


def _save_pretrained(model, out_dir: Path, **kwargs) -> list[str]:
    """save_pretrained into a temp dir, then copy every file it wrote (and only those)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        names = sorted(os.listdir(tmp))
        for n in names:
            shutil.copyfile(Path(tmp) / n, out_dir / n)
    # The written config names the folder it was loaded from (`_name_or_path`, an absolute path);
    # the source fixture's config is the same model without it.
    shutil.copyfile(GOLDEN / SOURCE / "config.json", out_dir / "config.json")
    return names


def _forward(model, io: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: io[k] for k in INPUTS}, return_dict=False)[0]


def make_sharded(model, io) -> None:
    out_dir = GOLDEN / f"{SOURCE}_sharded"
    names = _save_pretrained(model, out_dir, max_shard_size=SHARD_SIZE)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert "diffusion_pytorch_model.safetensors.index.json" in names, names
    assert len(shards) > 1, names
    again = SD3Transformer2DModel.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    assert torch.equal(_forward(again, io), io["output"]), "sharded reload differs"
    print(f"{out_dir.name}: {len(shards)} shards ({dir_size(out_dir)} bytes)")


def make_low_precision(model, io, dtype: torch.dtype, tag: str) -> None:
    out_dir = GOLDEN / f"{SOURCE}_{tag}"
    low = SD3Transformer2DModel.from_pretrained(GOLDEN / SOURCE, torch_dtype=dtype).eval()
    names = _save_pretrained(low, out_dir)
    assert names == ["config.json", "diffusion_pytorch_model.safetensors"], names
    stored = load_file(out_dir / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == dtype for t in stored.values()), {t.dtype for t in stored.values()}
    # The reference: the rounded weights, upcast, computed in f32 exactly like the f32 fixture.
    rounded = SD3Transformer2DModel.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in rounded.parameters())
    output = _forward(rounded, io)
    shift = (output - io["output"]).abs().max().item()
    save_io(
        out_dir / "io.safetensors",
        {"output": output},
        {
            "fixture": out_dir.name,
            "model": "SD3Transformer2DModel",
            "weights": f"{SOURCE} weights rounded to {tag}, loaded with torch_dtype=float32",
            "inputs": f"{SOURCE}/io.safetensors",
            "max_abs_diff_to_f32_output": f"{shift:.3e}",
        },
    )
    print(f"{out_dir.name}: output moved {shift:.3e} by the rounding ({dir_size(out_dir)} bytes)")


def main() -> None:
    setup_torch()
    model = SD3Transformer2DModel.from_pretrained(GOLDEN / SOURCE, torch_dtype=torch.float32).eval()
    io = load_file(GOLDEN / SOURCE / "io.safetensors")
    assert torch.equal(_forward(model, io), io["output"]), "sd3_tiny does not reproduce its output"
    make_sharded(model, io)
    make_low_precision(model, io, torch.float16, "f16")
    make_low_precision(model, io, torch.bfloat16, "bf16")


if __name__ == "__main__":
    main()
