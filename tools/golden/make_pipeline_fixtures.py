"""Golden fixtures for whole text-to-image pipelines: tiny random diffusers pipelines of each
family saved with `save_pretrained`, and the image diffusers makes from a given initial noise.

Writes assets/golden/pipelines/<name>/ — a complete model folder (model_index.json, scheduler,
tokenizers, text encoders, transformer, VAE) — plus <name>/golden/:
  call.json        the call: prompt, negative prompt, size, steps, guidance, sequence lengths,
                   klein's text_encoder_out_layers
  io.safetensors   noise (the `latents` argument, in the shape the pipeline takes it),
                   latents_out (output_type="latent"), image (output_type="pt", [b, 3, H, W] in
                   [0, 1]), prompt_embeds / pooled_prompt_embeds (what the transformer is fed)

Families:
  sd35_pipeline_tiny   StableDiffusion3Pipeline: CLIP-L + bigG (pads with "!") + T5, SD3.5-style
                       transformer (dual attention in block 0, qk-norm), AutoencoderKL with SD3's
                       scaling/shift, static shift 3.0, CFG 4 with a negative prompt. The CLIP
                       tokenizers are stored as vocab.json + merges.txt only, as on the Hub.
  flux1_pipeline_tiny  FluxPipeline: CLIP (pooled) + T5, guidance-embedding transformer, dynamic
                       shifting, packed latents.
  klein_pipeline_tiny  Flux2KleinPipeline: Qwen3 (layers 1, 2, 3 stacked), FLUX.2 transformer,
                       AutoencoderKLFlux2 with BatchNorm statistics, empirical μ, true CFG
                       (not distilled).

Run:  /work/venv/bin/python tools/golden/make_pipeline_fixtures.py   (after make_tokenizer_fixtures.py)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, randomize_for_parity, save_io, setup_torch  # noqa: E402

from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

OUT = GOLDEN / "pipelines"
TOKENIZERS = GOLDEN / "tokenizers"
PROMPT = "A photo of a red circle left of a blue square"
NEGATIVE = "blurry, low quality"
SIZE = 32  # pixels; every VAE here downsamples by 2


def clip(vocab: int, act: str, projection: bool, seed: int):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    randomize_for_parity(model, adaln_gain=1.0, norm_noise=0.25)
    return model


def t5(vocab: int, seed: int):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    model = T5EncoderModel(cfg).eval()
    randomize_for_parity(model, adaln_gain=1.0, norm_noise=0.25)
    return model


def autoencoder_kl(seed: int, scaling_factor: float, shift_factor: float):
    """AutoencoderKL downsampling by 2 with 4 latent channels and the family's latent scaling."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    randomize_for_parity(vae, adaln_gain=1.0, norm_noise=0.25)
    return vae


def write(name: str, pipe, call: dict, noise: torch.Tensor, embeds: dict, hub_clip: dict[str, str]) -> None:
    """Saves the pipeline; `hub_clip` maps tokenizer folders to the vocab.json + merges.txt pair
    that replaces their tokenizer.json (the Hub layout of SD3's CLIP tokenizers). The image comes
    from the pipeline reloaded from the written folder."""
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub, source in hub_clip.items():
        (folder / sub / "tokenizer.json").unlink()
        for f in ["vocab.json", "merges.txt"]:
            shutil.copyfile(TOKENIZERS / source / f, folder / sub / f)
    reloaded = type(pipe).from_pretrained(folder)
    with torch.no_grad():
        latents_out = reloaded(**call, latents=noise.clone(), output_type="latent").images
        image = reloaded(**call, latents=noise.clone(), output_type="pt").images
        in_memory = pipe(**call, latents=noise.clone(), output_type="pt").images
    drift = (image - in_memory).abs().max().item()
    assert drift < 1e-4, f"{name}: the reloaded pipeline differs by {drift}"
    print(f"{name}: reloaded vs in-memory max difference {drift:.1e}")
    golden = folder / "golden"
    golden.mkdir()
    (golden / "call.json").write_text(json.dumps(call, indent=2))
    save_io(
        golden / "io.safetensors",
        {"noise": noise, "latents_out": latents_out, "image": image, **embeds},
        {"pipeline": type(pipe).__name__},
    )
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{name}: image {list(image.shape)} range [{image.min():.3f}, {image.max():.3f}], {size} bytes")


def make_sd35() -> None:
    tok = CLIPTokenizer.from_pretrained(TOKENIZERS / "clip")
    tok_2 = CLIPTokenizer.from_pretrained(TOKENIZERS / "clip_bang")
    tok_3 = AutoTokenizer.from_pretrained(TOKENIZERS / "t5")
    torch.manual_seed(21)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    randomize_for_parity(transformer)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=autoencoder_kl(22, 1.5305, 0.0609),  # SD3's latent scaling
        text_encoder=clip(len(tok), "quick_gelu", True, 23),
        tokenizer=tok,
        text_encoder_2=clip(len(tok_2), "gelu", True, 24),
        tokenizer_2=tok_2,
        text_encoder_3=t5(len(tok_3), 25),
        tokenizer_3=tok_3,
    )
    call = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=4.0,
        max_sequence_length=32,
    )
    noise = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(
            PROMPT, PROMPT, PROMPT, negative_prompt=NEGATIVE, max_sequence_length=32, device="cpu"
        )
    embeds = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe, "negative_prompt_embeds": npe,
              "negative_pooled_prompt_embeds": nppe}
    write("sd35_pipeline_tiny", pipe, call, noise, embeds, {"tokenizer": "clip", "tokenizer_2": "clip_bang"})


def make_flux1() -> None:
    tok = CLIPTokenizer.from_pretrained(TOKENIZERS / "clip")
    tok_2 = AutoTokenizer.from_pretrained(TOKENIZERS / "t5")
    torch.manual_seed(31)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    randomize_for_parity(transformer)
    vae = autoencoder_kl(32, 0.3611, 0.1159)  # FLUX.1's latent scaling
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip(len(tok), "quick_gelu", False, 33),
        tokenizer=tok,
        text_encoder_2=t5(len(tok_2), 34),
        tokenizer_2=tok_2,
        transformer=transformer,
    )
    call = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=3.5,
                max_sequence_length=32)
    # FluxPipeline takes packed latents [b, (h/2)(w/2), 4c] for a [b, c, h, w] latent.
    unpacked = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(35))
    noise = FluxPipeline._pack_latents(unpacked, 1, 4, SIZE // 2, SIZE // 2)
    with torch.no_grad():
        pe, ppe, _ = pipe.encode_prompt(PROMPT, PROMPT, device="cpu", max_sequence_length=32)
    write("flux1_pipeline_tiny", pipe, call, noise, {"prompt_embeds": pe, "pooled_prompt_embeds": ppe,
                                                     "noise_unpacked": unpacked}, {})


def make_klein() -> None:
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen3")
    torch.manual_seed(41)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    ).eval()
    randomize_for_parity(text_encoder, adaln_gain=1.0, norm_noise=0.25)
    torch.manual_seed(42)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,  # 3 stacked Qwen3 layers x 16
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(2, 2, 2, 2),
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=False,
    ).eval()
    randomize_for_parity(transformer)
    torch.manual_seed(43)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
        patch_size=(2, 2),
    ).eval()
    randomize_for_parity(vae, adaln_gain=1.0, norm_noise=0.25)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.5 * torch.randn(16))
        vae.bn.running_var.copy_(torch.rand(16) * 1.5 + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer, is_distilled=False)
    call = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=4.0,
                max_sequence_length=24, text_encoder_out_layers=[1, 2, 3])
    # Klein takes 2x2-patchified latents [b, 4c, h/2, w/2] (it packs them itself).
    noise = torch.randn(1, 16, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(44))
    with torch.no_grad():
        pe, _ = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=24, text_encoder_out_layers=(1, 2, 3))
    write("klein_pipeline_tiny", pipe, call, noise, {"prompt_embeds": pe}, {})


if __name__ == "__main__":
    setup_torch()
    OUT.mkdir(parents=True, exist_ok=True)
    make_sd35()
    make_flux1()
    make_klein()
