"""Golden fixtures for the VAEs: SD3-style AutoencoderKL (16 latent channels) and the FLUX.2
AutoencoderKLFlux2 (32 latent channels, BatchNorm latent statistics).

For each tiny random model writes assets/golden/<name>/:
  config.json                          exactly what save_pretrained() writes
  diffusion_pytorch_model.safetensors  the weights, diffusers key layout (f32; FLUX.2 also has the
                                       int64 scalar buffer bn.num_batches_tracked)
  io.safetensors                       fixed inputs, decode / encode outputs and the pipeline-level
                                       latent (de)normalisation, all f32

Run:  /work/venv/bin/python tools/golden/make_vae_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, describe, dir_size, randomize_for_parity, save_io, save_model, setup_torch  # noqa: E402

from diffusers import AutoencoderKL, AutoencoderKLFlux2  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: E402

LAT_H, LAT_W = 4, 6  # non-square on purpose (catches H/W transpositions); image is 8 x 12


def _build(cls, cfg: dict, seed: int):
    torch.manual_seed(seed)
    model = cls(**cfg).eval()
    # VAE: keep PyTorch's default conv init; only give GroupNorm weights/biases (1 / 0) and
    # the attention linears a random perturbation so a port that ignores them fails.
    summary = randomize_for_parity(model, adaln_gain=1.0, norm_noise=0.25)
    return model, summary


def make_vae_sd3(seed: int = 7) -> None:
    name = "vae_sd3_tiny"
    cfg = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.5305,  # SD3 values (scripts/convert_sd3_to_diffusers.py)
        shift_factor=0.0609,
        force_upcast=True,
        use_quant_conv=False,  # SD3 / FLUX.1 VAEs have no quant convs
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    model, summary = _build(AutoencoderKL, cfg, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    # What the transformer produces ("model space"); the pipeline unscales it before decoding:
    # pipeline_stable_diffusion_3.py: latents = latents / scaling_factor + shift_factor
    latents_model_space = torch.randn(1, 16, LAT_H, LAT_W, generator=g)
    latent = latents_model_space / cfg["scaling_factor"] + cfg["shift_factor"]
    image = torch.rand(1, 3, 2 * LAT_H, 2 * LAT_W, generator=g) * 2.0 - 1.0  # images live in [-1, 1]
    with torch.no_grad():
        decoded = model.decode(latent, return_dict=False)[0]
        moments = model._encode(image)  # [1, 32, h, w] = cat(mean, logvar)
        dist = model.encode(image).latent_dist
        # img2img / training: (mean - shift) * scale  (pipeline_stable_diffusion_3_img2img.py)
        encoded_model_space = (dist.mean - cfg["shift_factor"]) * cfg["scaling_factor"]
    assert torch.equal(moments[:, :16], dist.mean)

    out_dir = GOLDEN / name
    save_model(model, out_dir)
    tensors = {
        "latents_model_space": latents_model_space,
        "latent": latent,
        "decoded": decoded,
        "image": image,
        "encoder_moments": moments,
        "encoded_mean": dist.mean,
        "encoded_logvar": dist.logvar,
        "encoded_model_space": encoded_model_space,
    }
    save_io(out_dir / "io.safetensors", tensors, {"fixture": name, "model": "AutoencoderKL", "seed": seed, **summary})
    m2 = AutoencoderKL.from_pretrained(out_dir).eval()
    with torch.no_grad():
        assert torch.equal(m2.decode(latent, return_dict=False)[0], decoded)
    print(f"{name}: ({dir_size(out_dir)} bytes)\n{describe(tensors)}")


def make_vae_flux2(seed: int = 8) -> None:
    name = "vae_flux2_tiny"
    cfg = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        decoder_block_out_channels=None,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=32,
        norm_num_groups=4,
        sample_size=16,
        use_quant_conv=True,  # the FLUX.2 VAE keeps quant_conv / post_quant_conv (class defaults)
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        batch_norm_eps=1e-4,
        batch_norm_momentum=0.1,
        patch_size=(2, 2),
    )
    model, summary = _build(AutoencoderKLFlux2, cfg, seed)
    with torch.no_grad():
        # Non-trivial BatchNorm statistics (128 = 32 channels x 2x2 patch) so the test exercises them.
        model.bn.running_mean.copy_(0.5 * torch.randn(128))
        model.bn.running_var.copy_(torch.rand(128) * 1.5 + 0.5)
        model.bn.num_batches_tracked.fill_(1000)
    eps = cfg["batch_norm_eps"]
    g = torch.Generator().manual_seed(seed + 1000)
    # Decode path of pipeline_flux2_klein.py (~L905-915): the transformer works on normalised,
    # 2x2-patchified latents [B, 128, H/2, W/2]; the pipeline de-normalises with the BN statistics,
    # un-patchifies to [B, 32, H, W] and calls vae.decode.
    latents_normalized = torch.randn(1, 128, LAT_H // 2, LAT_W // 2, generator=g)
    bn_mean = model.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + eps)
    latents_patchified = latents_normalized * bn_std + bn_mean
    latent = Flux2KleinPipeline._unpatchify_latents(latents_patchified)
    image = torch.rand(1, 3, 2 * LAT_H, 2 * LAT_W, generator=g) * 2.0 - 1.0
    with torch.no_grad():
        decoded = model.decode(latent, return_dict=False)[0]
        moments = model._encode(image)
        dist = model.encode(image).latent_dist
        # Encode path (_encode_vae_image): argmax (= mean) -> patchify -> (x - mean) / std
        enc_patch = Flux2KleinPipeline._patchify_latents(dist.mean)
        encoded_normalized = (enc_patch - bn_mean) / bn_std
    assert torch.equal(Flux2KleinPipeline._patchify_latents(latent), latents_patchified)

    out_dir = GOLDEN / name
    save_model(model, out_dir)
    tensors = {
        "latents_normalized": latents_normalized,
        "latents_patchified": latents_patchified,
        "latent": latent,
        "decoded": decoded,
        "image": image,
        "encoder_moments": moments,
        "encoded_mean": dist.mean,
        "encoded_logvar": dist.logvar,
        "encoded_patchified": enc_patch,
        "encoded_normalized": encoded_normalized,
        "bn_running_mean": model.bn.running_mean,
        "bn_running_var": model.bn.running_var,
    }
    save_io(
        out_dir / "io.safetensors", tensors, {"fixture": name, "model": "AutoencoderKLFlux2", "seed": seed, **summary}
    )
    m2 = AutoencoderKLFlux2.from_pretrained(out_dir).eval()
    with torch.no_grad():
        assert torch.equal(m2.decode(latent, return_dict=False)[0], decoded)
        assert torch.equal(m2.bn.running_var, model.bn.running_var)
    print(f"{name}: ({dir_size(out_dir)} bytes)\n{describe(tensors)}")


def main() -> None:
    setup_torch()
    make_vae_sd3()
    make_vae_flux2()


if __name__ == "__main__":
    main()
