"""Re-save the tiny golden transformers in the ORIGINAL single-file layouts people download:

  assets/golden/sd35_tiny/original_sai.safetensors   Stability AI SD3.5 layout (model.diffusion_model.joint_blocks...)
  assets/golden/flux1_tiny/original_bfl.safetensors  Black Forest Labs FLUX.1 layout (double_blocks..., single_blocks...)
  assets/golden/flux2_tiny/original_bfl.safetensors  Black Forest Labs FLUX.2 layout

Each file is produced by inverting diffusers' own conversion, then PROVEN by running the file back
through the conversion function shipped in the installed diffusers wheel
(diffusers/loaders/single_file_utils.py) and asserting that the result equals the diffusers state dict
exactly (same keys, bit-identical tensors) with no original key left unused. The SD3.5 and FLUX.2
files are in addition loaded through <Model>.from_single_file(config=<local fixture dir>) and re-run
against io.safetensors (bit-identical output). FLUX.1 cannot go through from_single_file at a tiny
width: diffusers' converter hard-codes inner_dim = 3072 (see flux1_converter_for_any_width).

Needs make_transformer_fixtures.py to have run first.
Run:  /work/venv/bin/python tools/golden/make_original_layout_fixtures.py
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GOLDEN, setup_torch  # noqa: E402

import diffusers  # noqa: E402
from diffusers import FluxTransformer2DModel, Flux2Transformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402


def swap_halves(w: torch.Tensor) -> torch.Tensor:
    """diffusers (scale, shift) <-> original (shift, scale). Its own inverse."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


class Taker:
    """Pops diffusers keys so we can assert every one of them went into the original file."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = dict(sd)

    def __call__(self, key: str) -> torch.Tensor:
        return self.sd.pop(key)

    def has(self, key: str) -> bool:
        return key in self.sd

    def done(self) -> None:
        assert not self.sd, f"diffusers keys not written: {sorted(self.sd)}"


# --------------------------------------------------------------------------------------------
# SD3 / SD3.5 (Stability AI layout)
# --------------------------------------------------------------------------------------------

def sd3_to_sai(sd: dict[str, torch.Tensor], num_layers: int, prefix: str = "model.diffusion_model.") -> dict:
    t = Taker(sd)
    o: dict[str, torch.Tensor] = {}
    o["pos_embed"] = t("pos_embed.pos_embed")
    for p in ("weight", "bias"):
        o[f"x_embedder.proj.{p}"] = t(f"pos_embed.proj.{p}")
        o[f"t_embedder.mlp.0.{p}"] = t(f"time_text_embed.timestep_embedder.linear_1.{p}")
        o[f"t_embedder.mlp.2.{p}"] = t(f"time_text_embed.timestep_embedder.linear_2.{p}")
        o[f"y_embedder.mlp.0.{p}"] = t(f"time_text_embed.text_embedder.linear_1.{p}")
        o[f"y_embedder.mlp.2.{p}"] = t(f"time_text_embed.text_embedder.linear_2.{p}")
        o[f"context_embedder.{p}"] = t(f"context_embedder.{p}")
        o[f"final_layer.linear.{p}"] = t(f"proj_out.{p}")
        o[f"final_layer.adaLN_modulation.1.{p}"] = swap_halves(t(f"norm_out.linear.{p}"))
    for i in range(num_layers):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            o[f"{x}attn.qkv.{p}"] = torch.cat([t(f"{d}attn.to_{n}.{p}") for n in "qkv"], dim=0)
            o[f"{c}attn.qkv.{p}"] = torch.cat([t(f"{d}attn.add_{n}_proj.{p}") for n in "qkv"], dim=0)
            o[f"{x}attn.proj.{p}"] = t(f"{d}attn.to_out.0.{p}")
            o[f"{x}adaLN_modulation.1.{p}"] = t(f"{d}norm1.linear.{p}")
            o[f"{x}mlp.fc1.{p}"] = t(f"{d}ff.net.0.proj.{p}")
            o[f"{x}mlp.fc2.{p}"] = t(f"{d}ff.net.2.{p}")
            ctx_mod = t(f"{d}norm1_context.linear.{p}")
            # last block: AdaLayerNormContinuous (scale, shift) <- original (shift, scale)
            o[f"{c}adaLN_modulation.1.{p}"] = swap_halves(ctx_mod) if last else ctx_mod
            if not last:
                o[f"{c}attn.proj.{p}"] = t(f"{d}attn.to_add_out.{p}")
                o[f"{c}mlp.fc1.{p}"] = t(f"{d}ff_context.net.0.proj.{p}")
                o[f"{c}mlp.fc2.{p}"] = t(f"{d}ff_context.net.2.{p}")
            if t.has(f"{d}attn2.to_q.{p}"):
                o[f"{x}attn2.qkv.{p}"] = torch.cat([t(f"{d}attn2.to_{n}.{p}") for n in "qkv"], dim=0)
                o[f"{x}attn2.proj.{p}"] = t(f"{d}attn2.to_out.0.{p}")
        if t.has(f"{d}attn.norm_q.weight"):
            o[f"{x}attn.ln_q.weight"] = t(f"{d}attn.norm_q.weight")
            o[f"{x}attn.ln_k.weight"] = t(f"{d}attn.norm_k.weight")
            o[f"{c}attn.ln_q.weight"] = t(f"{d}attn.norm_added_q.weight")
            o[f"{c}attn.ln_k.weight"] = t(f"{d}attn.norm_added_k.weight")
        if t.has(f"{d}attn2.norm_q.weight"):
            o[f"{x}attn2.ln_q.weight"] = t(f"{d}attn2.norm_q.weight")
            o[f"{x}attn2.ln_k.weight"] = t(f"{d}attn2.norm_k.weight")
    t.done()
    return {prefix + k: v for k, v in o.items()}


# --------------------------------------------------------------------------------------------
# FLUX.1 (Black Forest Labs layout)
# --------------------------------------------------------------------------------------------

def flux1_to_bfl(sd: dict[str, torch.Tensor], num_layers: int, num_single_layers: int) -> dict:
    t = Taker(sd)
    o: dict[str, torch.Tensor] = {}
    for p in ("weight", "bias"):
        o[f"time_in.in_layer.{p}"] = t(f"time_text_embed.timestep_embedder.linear_1.{p}")
        o[f"time_in.out_layer.{p}"] = t(f"time_text_embed.timestep_embedder.linear_2.{p}")
        o[f"vector_in.in_layer.{p}"] = t(f"time_text_embed.text_embedder.linear_1.{p}")
        o[f"vector_in.out_layer.{p}"] = t(f"time_text_embed.text_embedder.linear_2.{p}")
        if t.has(f"time_text_embed.guidance_embedder.linear_1.{p}"):
            o[f"guidance_in.in_layer.{p}"] = t(f"time_text_embed.guidance_embedder.linear_1.{p}")
            o[f"guidance_in.out_layer.{p}"] = t(f"time_text_embed.guidance_embedder.linear_2.{p}")
        o[f"txt_in.{p}"] = t(f"context_embedder.{p}")
        o[f"img_in.{p}"] = t(f"x_embedder.{p}")
        o[f"final_layer.linear.{p}"] = t(f"proj_out.{p}")
        o[f"final_layer.adaLN_modulation.1.{p}"] = swap_halves(t(f"norm_out.linear.{p}"))
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            o[f"{b}img_mod.lin.{p}"] = t(f"{d}norm1.linear.{p}")
            o[f"{b}txt_mod.lin.{p}"] = t(f"{d}norm1_context.linear.{p}")
            o[f"{b}img_attn.qkv.{p}"] = torch.cat([t(f"{d}attn.to_{n}.{p}") for n in "qkv"], dim=0)
            o[f"{b}txt_attn.qkv.{p}"] = torch.cat([t(f"{d}attn.add_{n}_proj.{p}") for n in "qkv"], dim=0)
            o[f"{b}img_attn.proj.{p}"] = t(f"{d}attn.to_out.0.{p}")
            o[f"{b}txt_attn.proj.{p}"] = t(f"{d}attn.to_add_out.{p}")
            o[f"{b}img_mlp.0.{p}"] = t(f"{d}ff.net.0.proj.{p}")
            o[f"{b}img_mlp.2.{p}"] = t(f"{d}ff.net.2.{p}")
            o[f"{b}txt_mlp.0.{p}"] = t(f"{d}ff_context.net.0.proj.{p}")
            o[f"{b}txt_mlp.2.{p}"] = t(f"{d}ff_context.net.2.{p}")
        o[f"{b}img_attn.norm.query_norm.scale"] = t(f"{d}attn.norm_q.weight")
        o[f"{b}img_attn.norm.key_norm.scale"] = t(f"{d}attn.norm_k.weight")
        o[f"{b}txt_attn.norm.query_norm.scale"] = t(f"{d}attn.norm_added_q.weight")
        o[f"{b}txt_attn.norm.key_norm.scale"] = t(f"{d}attn.norm_added_k.weight")
    for i in range(num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            o[f"{b}modulation.lin.{p}"] = t(f"{d}norm.linear.{p}")
            o[f"{b}linear1.{p}"] = torch.cat(
                [t(f"{d}attn.to_q.{p}"), t(f"{d}attn.to_k.{p}"), t(f"{d}attn.to_v.{p}"), t(f"{d}proj_mlp.{p}")], dim=0
            )
            o[f"{b}linear2.{p}"] = t(f"{d}proj_out.{p}")
        o[f"{b}norm.query_norm.scale"] = t(f"{d}attn.norm_q.weight")
        o[f"{b}norm.key_norm.scale"] = t(f"{d}attn.norm_k.weight")
    t.done()
    return o


def flux1_converter_for_any_width():
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers hard-codes `inner_dim = 3072`
    (the real FLUX.1 width) for splitting single_blocks.N.linear1. Rebuild the very same function
    from its installed source with that one constant replaced by the width read off the checkpoint."""
    fn = sfu.convert_flux_transformer_checkpoint_to_diffusers
    src = inspect.getsource(fn)
    needle = "    inner_dim = 3072\n"
    assert src.count(needle) == 1, "diffusers changed convert_flux_transformer_checkpoint_to_diffusers"
    src = src.replace(needle, '    inner_dim = checkpoint["img_in.weight"].shape[0]\n')
    ns = dict(vars(sfu))
    exec(compile(src, inspect.getsourcefile(fn), "exec"), ns)
    return ns[fn.__name__]


# --------------------------------------------------------------------------------------------
# FLUX.2 (Black Forest Labs layout)
# --------------------------------------------------------------------------------------------

def flux2_to_bfl(sd: dict[str, torch.Tensor], num_layers: int, num_single_layers: int) -> dict:
    t = Taker(sd)
    o: dict[str, torch.Tensor] = {}
    o["img_in.weight"] = t("x_embedder.weight")
    o["txt_in.weight"] = t("context_embedder.weight")
    o["time_in.in_layer.weight"] = t("time_guidance_embed.timestep_embedder.linear_1.weight")
    o["time_in.out_layer.weight"] = t("time_guidance_embed.timestep_embedder.linear_2.weight")
    if t.has("time_guidance_embed.guidance_embedder.linear_1.weight"):
        o["guidance_in.in_layer.weight"] = t("time_guidance_embed.guidance_embedder.linear_1.weight")
        o["guidance_in.out_layer.weight"] = t("time_guidance_embed.guidance_embedder.linear_2.weight")
    for m in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        o[f"{m}.lin.weight"] = t(f"{m}.linear.weight")
    o["final_layer.linear.weight"] = t("proj_out.weight")
    o["final_layer.adaLN_modulation.1.weight"] = swap_halves(t("norm_out.linear.weight"))
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        o[f"{b}img_attn.qkv.weight"] = torch.cat([t(f"{d}attn.to_{n}.weight") for n in "qkv"], dim=0)
        o[f"{b}txt_attn.qkv.weight"] = torch.cat([t(f"{d}attn.add_{n}_proj.weight") for n in "qkv"], dim=0)
        o[f"{b}img_attn.norm.query_norm.scale"] = t(f"{d}attn.norm_q.weight")
        o[f"{b}img_attn.norm.key_norm.scale"] = t(f"{d}attn.norm_k.weight")
        o[f"{b}txt_attn.norm.query_norm.scale"] = t(f"{d}attn.norm_added_q.weight")
        o[f"{b}txt_attn.norm.key_norm.scale"] = t(f"{d}attn.norm_added_k.weight")
        o[f"{b}img_attn.proj.weight"] = t(f"{d}attn.to_out.0.weight")
        o[f"{b}txt_attn.proj.weight"] = t(f"{d}attn.to_add_out.weight")
        o[f"{b}img_mlp.0.weight"] = t(f"{d}ff.linear_in.weight")
        o[f"{b}img_mlp.2.weight"] = t(f"{d}ff.linear_out.weight")
        o[f"{b}txt_mlp.0.weight"] = t(f"{d}ff_context.linear_in.weight")
        o[f"{b}txt_mlp.2.weight"] = t(f"{d}ff_context.linear_out.weight")
    for i in range(num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        o[f"{b}linear1.weight"] = t(f"{d}attn.to_qkv_mlp_proj.weight")
        o[f"{b}linear2.weight"] = t(f"{d}attn.to_out.weight")
        o[f"{b}norm.query_norm.scale"] = t(f"{d}attn.norm_q.weight")
        o[f"{b}norm.key_norm.scale"] = t(f"{d}attn.norm_k.weight")
    t.done()
    return o


# --------------------------------------------------------------------------------------------

def verify(name: str, original: dict, reference: dict, convert) -> None:
    ckpt = {k: v.clone() for k, v in original.items()}
    converted = convert(ckpt)
    leftover = sorted(ckpt)  # the SD3 / FLUX.1 converters pop what they use
    assert not leftover, f"{name}: original keys the diffusers converter did not use: {leftover}"
    assert sorted(converted) == sorted(reference), (
        f"{name}: key mismatch\n only converted: {sorted(set(converted) - set(reference))}\n"
        f" only reference: {sorted(set(reference) - set(converted))}"
    )
    for k, v in reference.items():
        assert converted[k].dtype == v.dtype and torch.equal(converted[k], v), f"{name}: {k} differs"
    print(f"{name}: {len(original)} original keys -> {len(converted)} diffusers keys, all bit-identical "
          f"via {getattr(convert, '__name__', convert)}")


def write(path: Path, tensors: dict, layout: str, verified_by: str) -> None:
    # Metadata {"format": "pt"} only, like the real single files (and a single key keeps the file
    # byte-reproducible); the provenance is printed here and documented in tools/golden/README.md.
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata={"format": "pt"})
    path.chmod(0o644)
    print(f"  wrote {path.relative_to(GOLDEN.parent.parent)} ({path.stat().st_size} bytes): {layout}; "
          f"verified by {verified_by} (diffusers {diffusers.__version__})")


def do_sd35() -> None:
    d = GOLDEN / "sd35_tiny"
    model = SD3Transformer2DModel.from_pretrained(d).eval()
    ref = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    orig = sd3_to_sai(ref, model.config.num_layers)
    fn = sfu.convert_sd3_transformer_checkpoint_to_diffusers
    verify("sd35_tiny", orig, ref, fn)
    path = d / "original_sai.safetensors"
    write(path, orig, "Stability AI SD3.5 single file (transformer only)", f"diffusers.loaders.single_file_utils.{fn.__name__}")
    # Full loader path: from_single_file with the local diffusers config, then re-run the golden forward.
    m2 = SD3Transformer2DModel.from_single_file(str(path), config=str(d), torch_dtype=torch.float32).eval()
    io = load_file(str(d / "io.safetensors"))
    with torch.no_grad():
        out = m2(
            hidden_states=io["hidden_states"],
            encoder_hidden_states=io["encoder_hidden_states"],
            pooled_projections=io["pooled_projections"],
            timestep=io["timestep"],
            return_dict=False,
        )[0]
    assert torch.equal(out, io["output"]), "sd35_tiny: from_single_file forward differs"
    print("  SD3Transformer2DModel.from_single_file(original_sai.safetensors) reproduces io.safetensors:output exactly")


def do_flux1() -> None:
    d = GOLDEN / "flux1_tiny"
    model = FluxTransformer2DModel.from_pretrained(d).eval()
    ref = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    orig = flux1_to_bfl(ref, model.config.num_layers, model.config.num_single_layers)
    verify("flux1_tiny", orig, ref, flux1_converter_for_any_width())
    write(
        d / "original_bfl.safetensors",
        orig,
        "Black Forest Labs FLUX.1 single file",
        "diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers "
        "(installed source, with its hard-coded inner_dim = 3072 replaced by img_in.weight.shape[0])",
    )


def do_flux2() -> None:
    d = GOLDEN / "flux2_tiny"
    model = Flux2Transformer2DModel.from_pretrained(d).eval()
    ref = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    orig = flux2_to_bfl(ref, model.config.num_layers, model.config.num_single_layers)
    fn = sfu.convert_flux2_transformer_checkpoint_to_diffusers
    # This converter moves every key out of its input dict first, so "nothing left over" is
    # checked by the exact key-set equality instead.
    verify("flux2_tiny", orig, ref, fn)
    path = d / "original_bfl.safetensors"
    write(path, orig, "Black Forest Labs FLUX.2 single file", f"diffusers.loaders.single_file_utils.{fn.__name__}")
    m2 = Flux2Transformer2DModel.from_single_file(str(path), config=str(d), torch_dtype=torch.float32).eval()
    io = load_file(str(d / "io.safetensors"))
    with torch.no_grad():
        out = m2(
            hidden_states=io["hidden_states"],
            encoder_hidden_states=io["encoder_hidden_states"],
            timestep=io["timestep"],
            img_ids=io["img_ids"],
            txt_ids=io["txt_ids"],
            guidance=None,
            return_dict=False,
        )[0]
    assert torch.equal(out, io["output"]), "flux2_tiny: from_single_file forward differs"
    print("  Flux2Transformer2DModel.from_single_file(original_bfl.safetensors) reproduces io.safetensors:output exactly")


def main() -> None:
    setup_torch()
    do_sd35()
    do_flux1()
    do_flux2()


if __name__ == "__main__":
    main()
