"""The PyTorch side of the end-to-end benchmark of the bundled Shapes model: the same weights and
the same workload as `portaflow bench`, run with diffusers / transformers / peft on the CPU.

What it mirrors (the Rust file in brackets):
- prompt encoding [`text/tokenizer.rs`, `text/clip.rs`, `pipeline/text.rs`]: `tokenizer.json`,
  `[start] tokens [end] <pad>…` padded to the encoder's context length (16); the CLIP runs with its
  causal mask only (no padding mask), pooled at the first end token; conditioning = penultimate
  hidden state + projected pooled vector;
- Euler sampling with CFG [`pipeline/mod.rs` `generate`, `sample/pipeline.rs` `sample`]: the
  schedule `Schedule::shifted(steps, shift)`, timestep σ·1000, one forward on `[uncond; cond]` with
  the empty negative prompt, x-prediction turned into v = (x − x̂₀) / max(σ, 0.05) before the
  guidance, x ← x + (σ' − σ)·v; with a `vae/` folder (the bundled latent model) the latent is
  decoded by diffusers' `AutoencoderKL` (`z / scaling_factor + shift_factor`) [`model/vae.rs`
  `Vae::decode`]; then 8-bit images on the host;
- one GRPO epoch of `configs/grpo-shapes.toml` [`train/grpo/mod.rs`, `loss.rs`, `advantage.rs`,
  `sample/step.rs`]: a rollout with CPS on a random window of steps (Euler elsewhere), PPO's
  clipped loss on a peft LoRA, AdamW on the adapter, global-norm clipping, gradient accumulation,
  EMA of the adapter. Rewards are random (ours is a CPU colour-segmentation detector, a few ms,
  timed separately on the Rust side); advantages are computed from them as ours are.

Prints one JSON object on stdout (progress on stderr), with `portaflow bench --json`'s field names
where they mean the same: per (steps, batch) the first, median (upper middle, as ours) and min
seconds of a generate call, images/s and peak memory (`--prompt` repeated, ours by default; every
prompt pads to 16 tokens, so its words do not change the cost); per GRPO iteration the seconds of
the whole epoch, the rollout and the training, and peak memory per phase.

`--check-latents FILE` reads what `generate --latents` reads (`pipeline::read_noise`): a
safetensors file with exactly one f32 tensor `[n, c, h, w]` (the transformer's latent, `[n, 4,
16, 16]` for the bundled model), any key; it writes the Euler
images of `--prompt` to `--check-out` (`<stem>-<k>.png` when n > 1, as ours) and exits.

Run (from the repository root; `--threads 2` by default, the machine's two cores):
    /work/venv/bin/python tools/bench/shapes_torch.py --runs 5 --warmup 1 --grpo > torch.json
    target/release/portaflow --device cpu bench --runs 5 --warmup 1 \
        --grpo configs/grpo-shapes.toml --json ours.json
Pixel equality with our engine (same initial noise, Euler, CFG 4, 20 steps):
    /work/venv/bin/python tools/bench/shapes_torch.py --write-noise noise.safetensors --seed 1
    /work/venv/bin/python tools/bench/shapes_torch.py --check-latents noise.safetensors \
        --check-out torch.png --prompt "a photo of a red circle"
    target/release/portaflow --device cpu generate --prompt "a photo of a red circle" --steps 20 \
        --cfg 4 --seed 1 --latents noise.safetensors -o ours.png
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import random
import resource
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, SD3Transformer2DModel  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import CLIPTextModelWithProjection  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# `text/tokenizer.rs::PAD`: the bundled model pads with its own `<pad>` (id 0), not CLIP-L's end
# token.
PAD = "<pad>"
# `pipeline/mod.rs::MIN_SIGMA_DIVISOR`: JiT's floor of σ in the x̂₀ → v conversion.
MIN_SIGMA_DIVISOR = 0.05
NUM_TRAIN_TIMESTEPS = 1000
# `train/grpo/advantage.rs::STD_EPS`.
STD_EPS = 1e-4


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Memory


def status_mib(field: str) -> float:
    """`VmHWM` (peak RSS since the last reset) or `VmRSS` from /proc/self/status, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/self/clear_refs`)."""
    Path("/proc/self/clear_refs").write_text("5")


def ru_maxrss_mib() -> float:
    """Peak RSS of the whole process (never reset), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Shapes:
    tokenizer: Tokenizer
    pad_id: int
    max_length: int
    text_encoder: CLIPTextModelWithProjection
    transformer: torch.nn.Module
    shift: float
    resolution: int
    channels: int
    vae: AutoencoderKL | None


def load(model_dir: Path) -> Shapes:
    index = json.loads((model_dir / "model_index.json").read_text())
    if index.get("prediction") != "sample":
        raise SystemExit(
            f"{model_dir}/model_index.json: prediction is {index.get('prediction')!r}; this "
            "script mirrors the bundled x-prediction model (\"sample\")"
        )
    scheduler = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        model_dir / "text_encoder", torch_dtype=torch.float32
    ).eval()
    transformer = SD3Transformer2DModel.from_pretrained(
        model_dir / "transformer", torch_dtype=torch.float32
    ).eval()
    text_encoder.requires_grad_(False)
    transformer.requires_grad_(False)
    vae = None
    if (model_dir / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).eval()
        vae.requires_grad_(False)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer" / "tokenizer.json"))
    pad_id = tokenizer.token_to_id(PAD)
    if pad_id is None:
        raise SystemExit(f"{model_dir}/tokenizer/tokenizer.json has no `{PAD}` token")
    return Shapes(
        tokenizer=tokenizer,
        pad_id=pad_id,
        max_length=text_encoder.config.max_position_embeddings,
        text_encoder=text_encoder,
        transformer=transformer,
        shift=float(scheduler.get("shift", 1.0)),
        resolution=transformer.config.sample_size,
        channels=transformer.config.in_channels,
        vae=vae,
    )


def tokenize(pipe: Shapes, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`PromptTokenizer::encode_with_mask` for the bundled model: ids `[b, max_length]` and the
    mask (kept for reference: neither side feeds it to the CLIP). Too long is an error there."""
    ids, mask = [], []
    for prompt in prompts:
        row = pipe.tokenizer.encode(prompt, add_special_tokens=True).ids
        if len(row) > pipe.max_length:
            raise SystemExit(
                f"prompt is {len(row)} tokens, the text encoder takes {pipe.max_length}: {prompt!r}"
            )
        mask.append([1] * len(row) + [0] * (pipe.max_length - len(row)))
        ids.append(row + [pipe.pad_id] * (pipe.max_length - len(row)))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def encode(pipe: Shapes, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`TextStack::encode` (Clip): penultimate hidden state `[b, 16, 128]` and the projected
    pooled vector `[b, 128]`.

    Our CLIP (`text/clip.rs`) uses the causal mask only and pools at the first `eos_token_id`
    (41 here). transformers does the same when no `attention_mask` is passed and
    `eos_token_id != 2` (`(input_ids == eos_token_id).int().argmax(-1)`), so the mask is not
    passed. The end token is also the largest id, so the legacy argmax rule would agree too."""
    ids, _mask = tokenize(pipe, prompts)
    out = pipe.text_encoder(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def schedule(steps: int, shift: float) -> list[float]:
    """`Schedule::shifted`: linspace(s(1), s(1/1000), steps) shifted again, then 0 (f64)."""

    def static_shift(sigma: float) -> float:
        return shift * sigma / (1.0 + (shift - 1.0) * sigma)

    start, end = static_shift(1.0), static_shift(1.0 / NUM_TRAIN_TIMESTEPS)
    if steps == 1:
        line = [start]
    else:
        line = [start + (end - start) * i / (steps - 1) for i in range(steps)]
    return [static_shift(t) for t in line] + [0.0]


def velocity(
    transformer: torch.nn.Module, x: torch.Tensor, sigma: float, cond: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """`PipelineDenoiser::velocity`: the transformer at timestep σ·1000 predicts x̂₀;
    v = (x − x̂₀) / max(σ, 0.05)."""
    sequence, pooled = cond
    timestep = torch.full((x.shape[0],), sigma * NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
    x0 = transformer(
        hidden_states=x,
        encoder_hidden_states=sequence,
        pooled_projections=pooled,
        timestep=timestep,
        return_dict=False,
    )[0]
    return (x - x0) / max(sigma, MIN_SIGMA_DIVISOR)


def guided_velocity(
    transformer: torch.nn.Module,
    x: torch.Tensor,
    sigma: float,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> torch.Tensor:
    """`sample/pipeline.rs::guided_velocity`: one forward on `[uncond; cond]` (diffusers' order),
    the x̂₀ → v conversion on both halves, then v_u + w·(v_c − v_u)."""
    if uncond is None or scale == 1.0:
        return velocity(transformer, x, sigma, cond)
    batch = x.shape[0]
    both = velocity(
        transformer,
        torch.cat([x, x]),
        sigma,
        (torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]])),
    )
    v_uncond, v_cond = both[:batch], both[batch:]
    return v_uncond + (v_cond - v_uncond) * scale


def decode(pipe: Shapes, x: torch.Tensor) -> torch.Tensor:
    """`Vae::decode` for SD3-style autoencoders: the transformer's latent → pixels in [−1, 1];
    the identity for a pixel-space model."""
    if pipe.vae is None:
        return x
    config = pipe.vae.config
    z = x / config.scaling_factor + (config.shift_factor or 0.0)
    return pipe.vae.decode(z, return_dict=False)[0]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """`pipeline::to_images`: [−1, 1] → round((v + 1)·127.5) clamped, `[b, h, w, 3]` u8.
    Rust's `f32::round` rounds halves away from zero and torch's to even: floor(y + 0.5) agrees
    with Rust on every value that survives the clamp."""
    y = torch.floor((x + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


@torch.inference_mode()
def generate(
    pipe: Shapes, prompts: list[str], noise: torch.Tensor, steps: int, cfg: float
) -> np.ndarray:
    """`Pipeline::generate` with Euler: encode the prompts, then (with CFG) the empty negative
    prompt, sample from `noise`, return 8-bit images."""
    cond = encode(pipe, prompts)
    uncond = encode(pipe, [""] * len(prompts)) if cfg > 1.0 else None
    sigmas = schedule(steps, pipe.shift)
    x = noise
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = guided_velocity(pipe.transformer, x, sigma, cond, uncond, cfg)
        x = x + v * (sigma_next - sigma)
    return to_uint8(decode(pipe, x))


# ---------------------------------------------------------------------------------------------
# Sampling benchmark


def upper_median(times: list[float]) -> float:
    """`portaflow bench`'s median: the upper middle of the sorted times."""
    return sorted(times)[len(times) // 2]


def bench_sampling(pipe: Shapes, args: argparse.Namespace) -> list[dict]:
    """`cli/bench.rs` sampling: per (steps, batch), `warmup` untimed calls (the first one's time
    reported apart), then `runs` timed calls of `generate` (noise drawn inside, as ours)."""
    shape = (pipe.channels, pipe.resolution, pipe.resolution)
    generator = torch.Generator().manual_seed(args.seed)
    results = []
    for steps in args.steps:
        for batch in args.batches:
            prompts = [args.prompt] * batch
            reset_peak()
            times = []
            for _ in range(args.warmup + args.runs):
                start = time.perf_counter()
                noise = torch.randn((batch, *shape), generator=generator)
                images = generate(pipe, prompts, noise, steps, args.cfg)
                times.append(time.perf_counter() - start)
                assert images.shape[0] == batch
            timed = times[args.warmup :]
            median = upper_median(timed)
            result = {
                "steps": steps,
                "batch": batch,
                "transformer_batch": batch * (2 if args.cfg > 1.0 else 1),
                "first_seconds": times[0] if args.warmup > 0 else None,
                "median_seconds": median,
                "min_seconds": min(timed),
                "images_per_second": batch / median,
                "peak_memory_mib": status_mib("VmHWM"),
                "all_seconds": timed,
            }
            log(
                f"sample steps={steps} batch={batch}: median {median:.3f} s, "
                f"min {min(timed):.3f} s, {batch / median:.2f} images/s, "
                f"peak {result['peak_memory_mib']:.0f} MiB"
            )
            results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# GRPO (`train/grpo/mod.rs`), CPS only, no CFG, no KL: the shipped `configs/grpo-shapes.toml`


def read_grpo_config(path: Path) -> dict:
    config = tomllib.loads(path.read_text())
    s, t = config["sample"], config["train"]
    mirrored = {
        "sample.sde_type": (s.get("sde_type"), "cps"),
        "sample.guidance_scale": (s.get("guidance_scale"), 1.0),
        "sample.same_initial_noise": (s.get("same_initial_noise", False), False),
        "train.beta": (t.get("beta"), 0.0),
        "train.cfg": (t.get("cfg", False), False),
        "train.steps.type": (t["steps"].get("type"), "random-window"),
        "train.ratio_norm": (t.get("ratio_norm", False), False),
        "train.spatial": (t.get("spatial"), None),
        "train.dense_reward": (t.get("dense_reward"), None),
    }
    for key, (found, expected) in mirrored.items():
        if found != expected:
            raise SystemExit(
                f"{path}: {key} = {found!r}; this script mirrors only {expected!r} "
                "(the shipped grpo-shapes recipe)"
            )
    return config


def cps_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, eta: float
) -> tuple[torch.Tensor, float]:
    """`step::policy_mean` for CPS: x̂₀ = x − σv, x̂₁ = x + (1−σ)v,
    μ = (1−σ')·x̂₀ + σ'·cos(ηπ/2)·x̂₁, std = σ'·sin(ηπ/2); Euler when σ' = 0."""
    if sigma_next == 0.0 or eta == 0.0:
        return x + v * (sigma_next - sigma), 0.0
    angle = eta * math.pi / 2.0
    c = sigma_next * math.cos(angle)
    coef_x = (1.0 - sigma_next) + c
    coef_v = -(1.0 - sigma_next) * sigma + c * (1.0 - sigma)
    return x * coef_x + v * coef_v, sigma_next * math.sin(angle)


def cps_log_prob(sample: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`step::log_prob` for CPS: −mean_{c,h,w}((x' − μ)²), `[b]`."""
    return -(sample.detach() - mean).square().flatten(1).mean(1)


def advantages(rewards: list[float], groups: list[int]) -> list[float]:
    """`advantage::advantages` with `std_scope = "global"`: (r − mean of its group) /
    (population std of all rewards + 1e-4)."""
    std = float(np.std(rewards))
    means = {g: float(np.mean([r for r, h in zip(rewards, groups) if h == g])) for g in groups}
    return [(r - means[g]) / (std + STD_EPS) for r, g in zip(rewards, groups)]


def join(batches: list[dict]) -> dict:
    """`EpochData::concat`: the rollout batches' latents, log-probs and conditioning, in order."""
    cat = lambda part, key: torch.cat([b[part][key] for b in batches])  # noqa: E731
    return {
        "latents": {k: cat("latents", k) for k in batches[0]["latents"]},
        "log_probs": {k: cat("log_probs", k) for k in batches[0]["log_probs"]},
        "cond": (cat("cond", 0), cat("cond", 1)),
    }


class Grpo:
    """One `GrpoTrainer::epoch` at a time (without evaluation, grids and checkpoints)."""

    def __init__(self, pipe: Shapes, config: dict, seed: int):
        m, s, t = config["model"], config["sample"], config["train"]
        self.pipe, self.s, self.t = pipe, s, t
        lora = LoraConfig(
            r=m["lora_rank"],
            lora_alpha=m["lora_alpha"],
            target_modules=m["lora_targets"],
            init_lora_weights="gaussian",  # `LoraConfig::new`: N(0, 1/r) A, zero B
            lora_dropout=0.0,
        )
        # flow_grpo's way: `get_peft_model(pipeline.transformer, config)`; only the adapter trains.
        self.policy = get_peft_model(pipe.transformer, lora)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.lora_modules = sum(1 for n, _ in self.policy.named_modules() if n.endswith(".lora_A"))
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t["learning_rate"],
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=t["weight_decay"],
        )
        self.ema = [p.detach().clone() for p in self.params] if t.get("ema", False) else None
        self.global_step = 0
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        lines = (REPO / "assets" / "prompts" / "shapes_train.jsonl").read_text().splitlines()
        self.train_prompts = [json.loads(line)["prompt"] for line in lines if line.strip()]
        self.sigmas = schedule(s["steps"], pipe.shift)

    def window(self) -> list[int]:
        """`StepSelection::RandomWindow`: start uniform in lo..=hi − size."""
        w = self.t["steps"]
        start = self.rng.randint(w["lo"], w["hi"] - w["size"])
        return list(range(start, start + w["size"]))

    @torch.inference_mode()
    def rollout(self, prompts: list[str], trained: list[int]) -> dict:
        """`GrpoTrainer::rollout` of one batch: CPS on the trained steps, Euler elsewhere; keeps
        x_j, x_{j+1} and log π_old(x_{j+1} | x_j) of the trained steps, and the 8-bit images."""
        pipe, eta = self.pipe, self.s["noise_level"]
        cond = encode(pipe, prompts)
        shape = (len(prompts), pipe.channels, pipe.resolution, pipe.resolution)
        x = torch.randn(shape, generator=self.generator)
        path, log_probs = [x], {}
        for i in range(self.s["steps"]):
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            v = velocity(self.policy, x, sigma, cond)
            if i in trained:
                mean, std = cps_step(x, v, sigma, sigma_next, eta)
                x = mean + torch.randn(shape, generator=self.generator) * std
                log_probs[i] = cps_log_prob(x, mean)
            else:
                x = x + v * (sigma_next - sigma)
            path.append(x)
        latents = {k: path[k] for j in trained for k in (j, j + 1)}
        images = to_uint8(decode(self.pipe, x))
        return {"latents": latents, "log_probs": log_probs, "cond": cond, "images": images}

    def train(self, data: dict, kept: list[int], advantage: list[float], trained: list[int]):
        """`GrpoTrainer::train_on`: per micro-batch and trained step, the clipped surrogate on
        the recomputed log-prob, backward with scale 1/(grad_accum·|trained|); an optimizer step
        (global-norm clip, AdamW, EMA) every `grad_accum` micro-batches."""
        t, eta, batch = self.t, self.s["noise_level"], self.s["batch_size"]
        scale = 1.0 / (t["grad_accum"] * len(trained))
        micro_batches = len(kept) // batch
        pending = 0
        losses = []
        self.policy.train()
        for m in range(micro_batches):
            rows = torch.tensor(kept[m * batch : (m + 1) * batch])
            cond = (data["cond"][0][rows], data["cond"][1][rows])
            adv = torch.tensor(
                [advantage[r] for r in rows.tolist()], dtype=torch.float32
            ).clamp(-t["adv_clip_max"], t["adv_clip_max"])
            for j in trained:
                sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
                x = data["latents"][j][rows]
                x_next = data["latents"][j + 1][rows]
                old = data["log_probs"][j][rows]
                v = velocity(self.policy, x, sigma, cond)
                mean, _std = cps_step(x, v, sigma, sigma_next, eta)
                log_prob = cps_log_prob(x_next, mean)
                ratio = torch.exp(log_prob - old)
                clipped = ratio.clamp(1.0 - t["clip_range"], 1.0 + t["clip_range"])
                loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
                value = loss.item()  # ours reads the loss back to skip non-finite micro-batches
                if not math.isfinite(value):
                    raise RuntimeError(f"loss {value} at step {j} of micro-batch {m}")
                (loss * scale).backward()
                ratio.detach().tolist()  # ours reads the ratios back for its statistics
                losses.append(value)
            pending += 1
            if pending == t["grad_accum"] or m + 1 == micro_batches:
                self.optimizer_step()
                pending = 0
        self.policy.eval()
        return losses

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.t["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        n = self.global_step
        # `ema.rs`: after step n, when (n + 1) % every == 0, θ_ema += (1 − d)(θ − θ_ema),
        # d = min((1 + n)/(10 + n), cap).
        if self.ema is not None and (n + 1) % self.t["ema_every"] == 0:
            rate = 1.0 - min((1 + n) / (10 + n), self.t["ema_decay"])
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.add_(p.detach() - e, alpha=rate)

    def epoch(self) -> dict:
        s = self.s
        epoch_start = time.perf_counter()
        trained = self.window()
        # 1. prompts: groups_per_epoch distinct prompts, group_size copies each, shuffled.
        chosen = self.rng.sample(self.train_prompts, s["groups_per_epoch"])
        samples = [g for g in range(len(chosen)) for _ in range(s["group_size"])]
        self.rng.shuffle(samples)

        # 2. rollout in batches of batch_size.
        reset_peak()
        start = time.perf_counter()
        batches = []
        for offset in range(0, len(samples), s["batch_size"]):
            group = samples[offset : offset + s["batch_size"]]
            batches.append(self.rollout([chosen[g] for g in group], trained))
        # ours stops the rollout clock before joining the batches (`EpochData::concat`)
        seconds_rollout = time.perf_counter() - start
        data = join(batches)
        peak_rollout = status_mib("VmHWM")

        # 3. rewards (random: see the module doc) and advantages; all are non-zero, all kept.
        rewards = [self.rng.random() for _ in samples]
        advantage = advantages(rewards, samples)
        kept = [i for i, a in enumerate(advantage) if a != 0.0]
        kept = kept[: len(kept) - len(kept) % s["batch_size"]]
        self.rng.shuffle(kept)

        # 4. training.
        reset_peak()
        start = time.perf_counter()
        losses = self.train(data, kept, advantage, trained)
        seconds_train = time.perf_counter() - start
        peak_train = status_mib("VmHWM")
        return {
            "seconds": time.perf_counter() - epoch_start,
            "seconds_rollout": seconds_rollout,
            "seconds_reward_wait": 0.0,
            "seconds_train": seconds_train,
            "images": len(samples),
            "trained_steps": trained,
            "peak_memory_mib": max(peak_rollout, peak_train),
            "peak_memory_mib_rollout": peak_rollout,
            "peak_memory_mib_train": peak_train,
            "policy_loss": statistics.mean(losses),
        }


def bench_grpo(pipe: Shapes, args: argparse.Namespace) -> dict:
    """`cli/bench.rs` GRPO: `--grpo-iterations` epochs in a row (the first with first-use costs),
    each reported."""
    config = read_grpo_config(args.grpo_config)
    grpo = Grpo(pipe, config, args.seed)
    s = config["sample"]
    lora_parameters = sum(p.numel() for p in grpo.params)
    log(
        f"grpo: {s['groups_per_epoch']}×{s['group_size']} images, {s['steps']} steps, "
        f"{grpo.lora_modules} LoRA linears ({lora_parameters} parameters)"
    )
    iterations = []
    for iteration in range(args.grpo_iterations):
        result = {"iteration": iteration, **grpo.epoch()}
        log(
            f"grpo iteration {iteration}: {result['seconds']:.2f} s (rollout "
            f"{result['seconds_rollout']:.2f} s, train {result['seconds_train']:.2f} s), "
            f"steps {result['trained_steps']}, peak {result['peak_memory_mib']:.0f} MiB"
        )
        iterations.append(result)
    return {
        "config": str(args.grpo_config),
        "lora_linears": grpo.lora_modules,
        "lora_parameters": lora_parameters,
        "optimizer_steps": grpo.global_step,
        "rewards": "random (ours: the CPU colour-segmentation detector, timed on its own)",
        "iterations": iterations,
    }


# ---------------------------------------------------------------------------------------------
# Pixel equality with `portaflow generate --latents`


def read_noise(path: Path) -> torch.Tensor:
    """`pipeline::read_noise`: a safetensors file holding exactly one tensor `[n, c, h, w]`."""
    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise SystemExit(
            f"{path}: expected one tensor (the initial noise), "
            f"found {len(tensors)}: {list(tensors)}"
        )
    (key, noise), = tensors.items()
    if noise.dim() != 4:
        raise SystemExit(f"{path}: `{key}` is {list(noise.shape)}, expected [n, c, h, w]")
    return noise.float()


def check(pipe: Shapes, args: argparse.Namespace) -> dict:
    noise = read_noise(args.check_latents)
    images = generate(pipe, [args.prompt] * noise.shape[0], noise, args.check_steps, args.cfg)
    out = args.check_out
    paths = []
    for k, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{k}.png")
        Image.fromarray(image).save(path)
        paths.append(str(path))
    log(f"wrote {', '.join(paths)}")
    return {
        "latents": str(args.check_latents),
        "prompt": args.prompt,
        "steps": args.check_steps,
        "cfg": args.cfg,
        "images": paths,
    }


# ---------------------------------------------------------------------------------------------


def sgemm_gflops(n: int = 2048, reps: int = 10) -> float:
    """This machine's practical f32 peak: a 2048³ matmul with the chosen thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "assets" / "models" / "shapes-base")
    parser.add_argument("--runs", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--steps", type=ints, default=[4, 20], help="sampling steps, e.g. 4,20")
    parser.add_argument("--batches", type=ints, default=[1, 16], help="batch sizes, e.g. 1,16")
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--prompt", default="a photo of a red circle left of a blue square")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sampling", action="store_true", help="skip the sampling benchmark")
    parser.add_argument("--grpo", action="store_true", help="also time GRPO iterations")
    parser.add_argument("--grpo-iterations", type=int, default=2)
    parser.add_argument("--grpo-config", type=Path, default=REPO / "configs" / "grpo-shapes.toml")
    parser.add_argument(
        "--check-latents",
        type=Path,
        help="safetensors with one tensor [n, c, h, w] (as `generate --latents`): write the "
        "Euler image(s) of --prompt to --check-out and exit",
    )
    parser.add_argument("--check-out", type=Path, default=Path("torch.png"))
    parser.add_argument("--check-steps", type=int, default=20)
    parser.add_argument(
        "--write-noise",
        type=Path,
        help="write N(0, I) noise [1, c, h, w] (the transformer's input) from --seed under the key "
        "`latents` and exit",
    )
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0 or args.grpo_iterations < 1:
        parser.error("--runs and --grpo-iterations must be at least 1, --warmup at least 0")

    torch.set_num_threads(args.threads)
    if args.write_noise:
        config = json.loads((args.model / "transformer" / "config.json").read_text())
        shape = (1, config["in_channels"], config["sample_size"], config["sample_size"])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
        save_file({"latents": noise.contiguous()}, str(args.write_noise))
        log(f"wrote {args.write_noise}")
        return

    rss_before_load = status_mib("VmRSS")  # torch, diffusers and transformers themselves
    start = time.perf_counter()
    pipe = load(args.model)
    report = {
        "engine": "pytorch",
        "torch": torch.__version__,
        "diffusers": importlib.metadata.version("diffusers"),
        "peft": importlib.metadata.version("peft"),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "sgemm_gflops": sgemm_gflops(),
        "model": str(args.model),
        "parameters": {
            "transformer": sum(p.numel() for p in pipe.transformer.parameters()),
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
            # diffusers keeps the sin-cos position table as a buffer; ours counts it as a
            # (frozen) parameter in `portaflow bench`'s `parameters`.
            "transformer_buffers": sum(b.numel() for b in pipe.transformer.buffers()),
        },
        "seconds_load": time.perf_counter() - start,
        "rss_mib_before_load": rss_before_load,
        "rss_mib_after_load": status_mib("VmRSS"),
        # Other processes share the cores: the load average says how much.
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }
    if args.check_latents:
        report["check"] = check(pipe, args)
    else:
        report.update({"runs": args.runs, "warmup": args.warmup, "prompt": args.prompt})
        if not args.no_sampling:
            report["sampling"] = bench_sampling(pipe, args)
        if args.grpo:
            report["grpo"] = bench_grpo(pipe, args)
    report["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    report["peak_rss_mib"] = ru_maxrss_mib()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
