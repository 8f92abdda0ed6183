"""Forward time of each tiny golden model in diffusers on PyTorch CPU: the reference side of
`tools/bench/forward.sh` (the Rust side is `core/examples/bench_forward.rs`, same weights, same
inputs: the fixtures under assets/golden/).

Each model: load the fixture folder with from_pretrained (f32, eval), read its inputs from
io.safetensors, run WARMUP forwards, then time RUNS forwards one by one and report the median.
Prints one JSON object: {"torch": ..., "threads": 2, "runs": N, "models": {name: median_ms}}.

Run:  /work/venv/bin/python tools/bench/forward.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLFlux2,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from safetensors.torch import load_file  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[2] / "assets" / "golden"
THREADS = int(os.environ.get("TORCH_THREADS", "2"))
WARMUP = 5


def transformer_call(cls, fixture: str, keys: tuple[str, ...]):
    model = cls.from_pretrained(GOLDEN / fixture, torch_dtype=torch.float32).eval()
    io = load_file(GOLDEN / fixture / "io.safetensors")
    kwargs = {k: io[k] for k in keys if k in io}
    if cls is Flux2Transformer2DModel:
        kwargs.setdefault("guidance", None)
    return lambda: model(**kwargs, return_dict=False)[0]


def vae_decode_call(cls, fixture: str):
    """The raw decoder on a VAE-space latent (post-quant conv included, no latent scaling)."""
    model = cls.from_pretrained(GOLDEN / fixture, torch_dtype=torch.float32).eval()
    latent = load_file(GOLDEN / fixture / "io.safetensors")["latent"]
    return lambda: model.decode(latent, return_dict=False)[0]


SD3_KEYS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
FLUX1_KEYS = SD3_KEYS + ("img_ids", "txt_ids", "guidance")
FLUX2_KEYS = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")

MODELS = {
    "sd3_tiny": lambda: transformer_call(SD3Transformer2DModel, "sd3_tiny", SD3_KEYS),
    "sd35_tiny": lambda: transformer_call(SD3Transformer2DModel, "sd35_tiny", SD3_KEYS),
    "flux1_tiny": lambda: transformer_call(FluxTransformer2DModel, "flux1_tiny", FLUX1_KEYS),
    "flux2_tiny": lambda: transformer_call(Flux2Transformer2DModel, "flux2_tiny", FLUX2_KEYS),
    "vae_sd3_tiny.decode": lambda: vae_decode_call(AutoencoderKL, "vae_sd3_tiny"),
    "vae_flux2_tiny.decode": lambda: vae_decode_call(AutoencoderKLFlux2, "vae_flux2_tiny"),
}


def median_ms(call, runs: int) -> float:
    with torch.no_grad():
        for _ in range(WARMUP):
            call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    results = {name: round(median_ms(make(), args.runs), 3) for name, make in MODELS.items()}
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "threads": THREADS,
                "warmup": WARMUP,
                "runs": args.runs,
                "models": results,
            }
        )
    )


if __name__ == "__main__":
    main()
