"""Golden fixtures for the MMDiT transformers: SD3 / SD3.5, FLUX.1 (dev, schnell), FLUX.2 (klein, dev).

For each tiny random model writes assets/golden/<name>/:
  config.json                          exactly what save_pretrained() writes
  diffusion_pytorch_model.safetensors  the weights, diffusers key layout, f32
  io.safetensors                       fixed inputs, diffusers' output and intermediates (all f32)

Run:  /work/venv/bin/python tools/golden/make_transformer_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, Recorder, describe, dir_size, randomize_for_parity, save_io, save_model, setup_torch  # noqa: E402

from diffusers import FluxTransformer2DModel, Flux2Transformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: E402

BATCH = 2
TXT_LEN = 7
JOINT_DIM = 32
POOLED_DIM = 32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(cls, config: dict, seed: int):
    torch.manual_seed(seed)
    model = cls(**config).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    summary = randomize_for_parity(model)
    return model, summary


def _check_reload(cls, out_dir: Path, kwargs: dict, expected: torch.Tensor) -> None:
    """The written folder loads back through from_pretrained and reproduces the output bit-exactly."""
    m = cls.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        again = m(**kwargs, return_dict=False)[0]
    assert torch.equal(again, expected), f"{out_dir.name}: reload mismatch"


# --------------------------------------------------------------------------------------------
# SD3 / SD3.5
# --------------------------------------------------------------------------------------------

def sd3_config(sd35: bool) -> dict:
    return dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=JOINT_DIM,
        caption_projection_dim=32,  # must equal heads*head_dim (context goes straight into add_k_proj)
        pooled_projection_dim=POOLED_DIM,
        out_channels=16,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )


def make_sd3(name: str, sd35: bool, seed: int) -> None:
    cfg = sd3_config(sd35)
    model, perturbed = _build(SD3Transformer2DModel, cfg, seed)
    g = _gen(seed + 1000)
    # Non-square latent 8x12 -> 4x6 patches, cropped out of the 16x16 pos-embed grid.
    hidden_states = torch.randn(BATCH, 16, 8, 12, generator=g)
    encoder_hidden_states = torch.randn(BATCH, TXT_LEN, JOINT_DIM, generator=g)
    pooled_projections = torch.randn(BATCH, POOLED_DIM, generator=g)
    timestep = torch.tensor([1000.0, 437.5])  # SD3 convention: raw scheduler timesteps, sigma*1000
    kwargs = dict(
        hidden_states=hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        timestep=timestep,
    )
    rec_names = ["pos_embed", "time_text_embed", "context_embedder"]
    rec_names += [f"transformer_blocks.{i}" for i in range(cfg["num_layers"])]
    rec_names += ["norm_out", "proj_out"]
    rec = Recorder(model, rec_names)
    with torch.no_grad():
        output = model(**kwargs, return_dict=False)[0]
    rec.remove()

    out_dir = GOLDEN / name
    save_model(model, out_dir)
    tensors = dict(kwargs)
    tensors["output"] = output
    tensors.update(rec.store)
    save_io(
        out_dir / "io.safetensors",
        tensors,
        {
            "fixture": name,
            "model": "SD3Transformer2DModel",
            "seed": seed,
            **perturbed,
            "call": "model(hidden_states, encoder_hidden_states, pooled_projections, timestep)",
        },
    )
    _check_reload(SD3Transformer2DModel, out_dir, kwargs, output)
    print(f"{name}: output {list(output.shape)} ({dir_size(out_dir)} bytes)\n{describe(tensors)}")


# --------------------------------------------------------------------------------------------
# FLUX.1
# --------------------------------------------------------------------------------------------

def flux1_config(guidance: bool) -> dict:
    return dict(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        out_channels=None,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=JOINT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )


def make_flux1(name: str, guidance: bool, seed: int) -> None:
    cfg = flux1_config(guidance)
    model, perturbed = _build(FluxTransformer2DModel, cfg, seed)
    g = _gen(seed + 1000)
    lat_c, lat_h, lat_w = 4, 8, 12  # unpacked VAE-space latent (tiny: 4 channels instead of 16)
    latents = torch.randn(BATCH, lat_c, lat_h, lat_w, generator=g)
    hidden_states = FluxPipeline._pack_latents(latents, BATCH, lat_c, lat_h, lat_w)  # [B, 24, 16]
    img_ids = FluxPipeline._prepare_latent_image_ids(BATCH, lat_h // 2, lat_w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(TXT_LEN, 3)  # pipeline_flux.py encode_prompt
    encoder_hidden_states = torch.randn(BATCH, TXT_LEN, JOINT_DIM, generator=g)
    pooled_projections = torch.randn(BATCH, POOLED_DIM, generator=g)
    timestep = torch.tensor([1.0, 0.4375])  # the pipeline passes t/1000; the model multiplies by 1000
    kwargs = dict(
        hidden_states=hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        timestep=timestep,
        img_ids=img_ids,
        txt_ids=txt_ids,
    )
    if guidance:
        kwargs["guidance"] = torch.tensor([3.5, 4.0])  # the pipeline passes the raw scale; model x1000

    rec_names = ["x_embedder", "time_text_embed", "context_embedder"]
    rec_names += [f"transformer_blocks.{i}" for i in range(cfg["num_layers"])]
    rec_names += [f"single_transformer_blocks.{i}" for i in range(cfg["num_single_layers"])]
    rec_names += ["norm_out"]
    rec = Recorder(model, rec_names)
    with torch.no_grad():
        output = model(**kwargs, return_dict=False)[0]
        cos, sin = model.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
    rec.remove()

    out_dir = GOLDEN / name
    save_model(model, out_dir)
    tensors = {"latents_unpacked": latents, **kwargs, "output": output}
    tensors["intermediate.rope.cos"] = cos
    tensors["intermediate.rope.sin"] = sin
    tensors.update(rec.store)
    save_io(
        out_dir / "io.safetensors",
        tensors,
        {
            "fixture": name,
            "model": "FluxTransformer2DModel",
            "seed": seed,
            **perturbed,
            "call": "model(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids"
            + (", guidance)" if guidance else ")"),
        },
    )
    _check_reload(FluxTransformer2DModel, out_dir, kwargs, output)
    print(f"{name}: output {list(output.shape)} ({dir_size(out_dir)} bytes)\n{describe(tensors)}")


# --------------------------------------------------------------------------------------------
# FLUX.2
# --------------------------------------------------------------------------------------------

def flux2_config(guidance: bool) -> dict:
    return dict(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 patchify (klein: 32 x 4 = 128)
        out_channels=None,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=JOINT_DIM,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=guidance,
    )


def make_flux2(name: str, guidance: bool, seed: int) -> None:
    cfg = flux2_config(guidance)
    model, perturbed = _build(Flux2Transformer2DModel, cfg, seed)
    g = _gen(seed + 1000)
    # pipeline_flux2_klein.prepare_latents: latents are created already patchified, [B, C*4, H/2, W/2]
    latents = torch.randn(BATCH, 16, 4, 6, generator=g)
    img_ids = Flux2KleinPipeline._prepare_latent_ids(latents)  # [B, 24, 4] int64 (t, h, w, l)
    hidden_states = Flux2KleinPipeline._pack_latents(latents)  # [B, 24, 16]
    encoder_hidden_states = torch.randn(BATCH, TXT_LEN, JOINT_DIM, generator=g)
    txt_ids = Flux2KleinPipeline._prepare_text_ids(encoder_hidden_states)  # [B, 7, 4] (0, 0, 0, l)
    # The model uses ids[0] when given 3-D ids; store and pass the 2-D [N, 4] form as float32.
    img_ids = img_ids[0].to(torch.float32)
    txt_ids = txt_ids[0].to(torch.float32)
    timestep = torch.tensor([1.0, 0.4375])  # the pipeline passes t/1000; the model multiplies by 1000
    kwargs = dict(
        hidden_states=hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        timestep=timestep,
        img_ids=img_ids,
        txt_ids=txt_ids,
    )
    if guidance:
        kwargs["guidance"] = torch.tensor([4.0, 2.5])
    else:
        kwargs["guidance"] = None  # klein: pipeline passes guidance=None

    rec_names = [
        "x_embedder",
        "context_embedder",
        "time_guidance_embed",
        "double_stream_modulation_img",
        "double_stream_modulation_txt",
        "single_stream_modulation",
    ]
    rec_names += [f"transformer_blocks.{i}" for i in range(cfg["num_layers"])]
    rec_names += [f"single_transformer_blocks.{i}" for i in range(cfg["num_single_layers"])]
    rec_names += ["norm_out"]
    rec = Recorder(model, rec_names)
    with torch.no_grad():
        output = model(**kwargs, return_dict=False)[0]
        t_cos, t_sin = model.pos_embed(txt_ids)
        i_cos, i_sin = model.pos_embed(img_ids)
    rec.remove()

    out_dir = GOLDEN / name
    save_model(model, out_dir)
    tensors = {"latents_patchified": latents}
    tensors.update({k: v for k, v in kwargs.items() if v is not None})
    tensors["output"] = output
    tensors["intermediate.rope.cos"] = torch.cat([t_cos, i_cos], dim=0)
    tensors["intermediate.rope.sin"] = torch.cat([t_sin, i_sin], dim=0)
    tensors.update(rec.store)
    save_io(
        out_dir / "io.safetensors",
        tensors,
        {
            "fixture": name,
            "model": "Flux2Transformer2DModel",
            "seed": seed,
            **perturbed,
            "call": "model(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance="
            + ("guidance)" if guidance else "None)"),
        },
    )
    _check_reload(Flux2Transformer2DModel, out_dir, kwargs, output)
    print(f"{name}: output {list(output.shape)} ({dir_size(out_dir)} bytes)\n{describe(tensors)}")


def main() -> None:
    setup_torch()
    make_sd3("sd3_tiny", sd35=False, seed=3)
    make_sd3("sd35_tiny", sd35=True, seed=35)
    make_flux1("flux1_tiny", guidance=True, seed=1)
    make_flux1("flux1_schnell_tiny", guidance=False, seed=11)
    make_flux2("flux2_tiny", guidance=False, seed=2)
    make_flux2("flux2_dev_tiny", guidance=True, seed=22)


if __name__ == "__main__":
    main()
