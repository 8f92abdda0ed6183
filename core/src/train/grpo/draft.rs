//! DRaFT on the GRPO trainer (Clark et al., ALGORITHMS.md §4): sample with the deterministic
//! Euler sampler, keep the graph of the last K steps only, score the image with a
//! differentiable reward (the Shapes CLIP's image–prompt cosine) and descend −r (or the hinge
//! ReLU(margin − r)) on the adapter. DRaFT-LV (K = 1) treats sg(x̂₀) of the last step as data,
//! re-noises it n times to the last step's level and denoises each copy again with gradient; the
//! n + 1 predictions are all scored (FlowBP's flow-matching form).
//!
//! Prompts, adapter, optimizer, EMA, evaluation and checkpoints are the GRPO trainer's; only the
//! epoch's steps 2–4 differ. The configured `data` rewards are scored on the final images for the
//! log (training accuracy), not trained on.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{EpochMetrics, GrpoError, GrpoTrainer, mix, run_error};
use crate::model::vae::Vae;
use crate::pipeline::{PipelineDenoiser, PipelineError, to_images};
use crate::reward::clip_score::ShapesClip;
use crate::reward::{Score, Task};
use crate::sample::pipeline::{NoiseSource, SampleOptions, guided_velocity, sample};
use crate::sample::schedule::Schedule;
use crate::sample::select::StepPlan;
use crate::sample::step::StepKind;
use crate::text::tokenizer::PromptTokenizer;
use crate::world::render::Image;

/// The differentiable reward and the decoder the gradient passes through (autodiff device):
/// DRaFT's objective and RTDMD's final-step `L_BP`.
pub(super) struct DifferentiableReward {
    /// Frozen: gradients flow through it to the image, never into it.
    clip: ShapesClip,
    tokenizer: PromptTokenizer,
    vae: Option<Vae>,
}

impl DifferentiableReward {
    /// Loads the CLIP folder `clip` (the config field `field` names it) for a pipeline drawing
    /// `resolution`-pixel images.
    pub(super) fn load(
        clip_dir: &Path,
        field: &str,
        resolution: usize,
        vae: Option<Vae>,
        device: &Device,
    ) -> Result<Self, GrpoError> {
        check_clip_dir(clip_dir, field)?;
        let (clip, tokenizer) = ShapesClip::load_with_tokenizer(clip_dir, device)
            .map_err(|e| GrpoError::Config(format!("{field}: {e}")))?;
        if clip.config.image_size != resolution {
            return Err(run_error(
                clip_dir,
                format!(
                    "the CLIP reads {0}×{0} images but the model draws {1}×{1}",
                    clip.config.image_size, resolution
                ),
            ));
        }
        Ok(Self {
            clip: clip.no_grad(),
            tokenizer,
            vae,
        })
    }

    /// Cosine of each image with its prompt, `[b]`, differentiable in `latents`.
    pub(super) fn score(
        &self,
        latents: Tensor<4>,
        prompts: &[String],
    ) -> Result<Tensor<1>, GrpoError> {
        let device = latents.device();
        let pixels = match &self.vae {
            Some(vae) => vae.decode(latents),
            None => latents,
        }
        .clamp(-1.0, 1.0);
        let ids = self
            .tokenizer
            .encode(prompts)
            .map_err(|e| GrpoError::Config(format!("CLIP tokenizer: {e}")))?;
        let images = self.clip.embed_images(pixels);
        let texts = self.clip.embed_texts(&ids, &device);
        let b = prompts.len();
        // [b, k] ⊙ [b, k] → [b, 1] → [b]
        Ok((images * texts).sum_dim(1).reshape([b]))
    }
}

/// −r, or ReLU(margin − r).
pub(super) fn draft_loss(reward: Tensor<1>, margin: Option<f64>) -> Tensor<1> {
    match margin {
        Some(m) => reward.neg().add_scalar(m).clamp_min(0.0),
        None => reward.neg(),
    }
}

impl GrpoTrainer {
    /// One DRaFT epoch: every sample is one image, trained once (no groups, no advantages).
    pub(super) fn draft_epoch(
        &mut self,
    ) -> Result<(EpochMetrics, Vec<(Image, String)>), GrpoError> {
        let c = self.config.clone();
        let settings = c
            .train
            .draft
            .clone()
            .expect("draft_epoch needs train.draft");
        let epoch = self.epoch;
        let schedule = c
            .schedule(self.plain.scheduler.shift)
            .map_err(PipelineError::from)?;
        let n = schedule.steps();
        let first_graph_step = n - settings.k;
        let w = c.sample.guidance_scale;

        // The epoch's prompts: the training tasks in an order seeded by (seed, epoch).
        let mut rng = ChaCha8Rng::seed_from_u64(c.run.seed.wrapping_add(epoch as u64));
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        order.shuffle(&mut rng);
        let tasks: Vec<Task> = (0..c.samples_per_epoch())
            .map(|i| self.train[order[i % order.len()]].clone())
            .collect();

        let start = Instant::now();
        self.plain.transformer = self.policy.valid();
        let mut accumulator = GradientsAccumulator::<super::Transformer>::new();
        let mut pending = 0;
        let mut skipped = 0;
        let mut losses = Vec::new();
        let mut clip_rewards: Vec<f64> = Vec::new();
        let mut images: Vec<Image> = Vec::new();
        let mut grid: Vec<(Image, String)> = Vec::new();
        let mut seconds_rollout = 0.0;
        let batches: Vec<&[Task]> = tasks.chunks(c.sample.batch_size).collect();
        let micro_batches = batches.len();
        for (m, batch) in batches.into_iter().enumerate() {
            let rollout_start = Instant::now();
            let prompts: Vec<String> = batch.iter().map(|t| t.prompt().to_string()).collect();
            let ids: Vec<u64> = (0..batch.len())
                .map(|i| (m * c.sample.batch_size + i) as u64)
                .collect();
            let seeds = |stream: u64| -> Vec<u64> {
                ids.iter()
                    .map(|&id| mix(c.run.seed, epoch as u64, id, stream))
                    .collect()
            };
            let (cond_plain, uncond_plain) =
                self.plain
                    .guided_conditioning(&prompts, w, &self.plain_device)?;
            // CFG's scale; 1 for a model that takes guidance as an input (already in the cond).
            let w = if uncond_plain.is_some() { w } else { 1.0 };
            // Steps 0 … N−K−1 without a graph.
            let size = self.resolution();
            let shape = self.plain.latent_shape(size, size)?;
            let mut x = NoiseSource::new(seeds(0)).initial(shape, &self.plain_device);
            if first_graph_step > 0 {
                let head = Schedule {
                    sigmas: schedule.sigmas[..=first_graph_step].to_vec(),
                };
                let options = SampleOptions {
                    guidance_interval: None,
                    schedule: &head,
                    kind: StepKind::Euler,
                    plan: StepPlan::ode(head.steps()),
                    guidance_scale: w,
                    shared_seeds: None,
                    record: false,
                };
                let denoiser = PipelineDenoiser {
                    transformer: &self.plain.transformer,
                    prediction: self.plain.index.prediction,
                };
                (x, _) = sample(
                    &denoiser,
                    x,
                    &cond_plain,
                    uncond_plain.as_ref(),
                    &NoiseSource::new(seeds(1)),
                    &options,
                    |_| {},
                    None,
                )
                .map_err(PipelineError::from)?;
            }
            seconds_rollout += rollout_start.elapsed().as_secs_f64();

            // Steps N−K … N−1 with the graph; LV's copies after.
            let cond = cond_plain.autodiff();
            let uncond = uncond_plain.as_ref().map(|u| u.autodiff());
            let denoiser = PipelineDenoiser {
                transformer: &self.policy,
                prediction: self.plain.index.prediction,
            };
            let mut x = x.autodiff();
            for j in first_graph_step..n {
                let (sigma, next) = (schedule.sigmas[j], schedule.sigmas[j + 1]);
                let v = guided_velocity(&denoiser, x.clone(), sigma, &cond, uncond.as_ref(), w);
                x = x + v.mul_scalar(next - sigma);
            }
            let mut predictions = vec![x.clone()];
            if settings.lv_samples > 0 {
                // x_{N−1,i} = (1 − σ)·sg(x̂₀) + σ·ε_i, x̂₀,i = x_{N−1,i} − σ·v_θ(x_{N−1,i}).
                let sigma = schedule.sigmas[n - 1];
                let data = x.clone().detach();
                for i in 0..settings.lv_samples {
                    let eps = NoiseSource::new(seeds(3 + i as u64)).initial(shape, &self.device);
                    let noisy = data.clone().mul_scalar(1.0 - sigma) + eps.mul_scalar(sigma);
                    let v =
                        guided_velocity(&denoiser, noisy.clone(), sigma, &cond, uncond.as_ref(), w);
                    predictions.push(noisy - v.mul_scalar(sigma));
                }
            }
            let copies = predictions.len();
            let mut loss = Tensor::<1>::zeros([1], &self.device);
            let mut batch_rewards = Vec::new();
            for prediction in predictions {
                let reward = self.draft_reward().score(prediction, &prompts)?;
                batch_rewards.extend(
                    reward
                        .clone()
                        .into_data()
                        .convert::<f32>()
                        .try_to_vec::<f32>()
                        .expect("f32")
                        .into_iter()
                        .map(f64::from),
                );
                loss = loss + draft_loss(reward, settings.margin).mean();
            }
            let loss = loss.div_scalar(copies as f64);
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            let finished = to_images(self.plain.decode(x.inner()));
            if m == 0 {
                grid = finished.iter().cloned().zip(prompts.clone()).collect();
            }
            images.extend(finished);
            if loss_value.is_finite() {
                let grads = loss.div_scalar(c.train.grad_accum as f64).backward();
                accumulator.accumulate(
                    &self.policy,
                    GradientsParams::from_grads(grads, &self.policy),
                );
                losses.push(loss_value);
                clip_rewards.extend(batch_rewards);
            } else {
                tracing::warn!(
                    "epoch {}: DRaFT loss {loss_value} in micro-batch {m}; the micro-batch is skipped",
                    epoch + 1
                );
                skipped += 1;
            }
            pending += 1;
            if pending == c.train.grad_accum || m + 1 == micro_batches {
                let grads = accumulator.grads();
                if !grads.is_empty() {
                    self.optimizer_step(grads);
                }
                pending = 0;
            }
        }
        let seconds_train = start.elapsed().as_secs_f64() - seconds_rollout;

        // The configured rewards judge the final images, for the log.
        let mut by_tag: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut reward_means = BTreeMap::new();
        let scored: Vec<Vec<Option<Score>>> = self
            .rewards
            .iter()
            .map(|(reward, _)| reward.score(&images, &tasks))
            .collect::<Result<_, _>>()?;
        for ((reward, _), scores) in self.rewards.iter().zip(&scored) {
            let values: Vec<f64> = scores.iter().flatten().map(|s| s.reward as f64).collect();
            if !values.is_empty() {
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                reward_means.insert(reward.name().to_string(), mean);
            }
        }
        for (i, task) in tasks.iter().enumerate() {
            let success = scored.iter().any(|s| s[i].is_some_and(|s| s.success));
            let entry = by_tag.entry(task.tag().to_string()).or_default();
            entry.0 += success as usize;
            entry.1 += 1;
        }
        reward_means.insert(
            "clip-score".to_string(),
            clip_rewards.iter().sum::<f64>() / clip_rewards.len().max(1) as f64,
        );
        let count = clip_rewards.len().max(1) as f64;
        let mean = clip_rewards.iter().sum::<f64>() / count;
        let std = (clip_rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / count).sqrt();
        let successes: usize = by_tag.values().map(|(s, _)| s).sum();
        let metrics = EpochMetrics {
            epoch: epoch + 1,
            global_step: self.global_step,
            reward_mean: mean,
            reward_std: std,
            reward_means,
            train_accuracy: successes as f64 / tasks.len() as f64,
            train_accuracy_by_tag: by_tag
                .into_iter()
                .map(|(t, (s, total))| (t, s as f64 / total as f64))
                .collect(),
            // DRaFT has no groups, and its reward is the CLIP score above
            reward_by_tag: BTreeMap::new(),
            flat_groups: 0,
            kept: tasks.len() - skipped * c.sample.batch_size,
            trained_steps: (first_graph_step..n).collect(),
            approx_kl: 0.0,
            kl: 0.0,
            clip_fraction: 0.0,
            ratio_mean: 1.0,
            ratio_min: 1.0,
            ratio_max: 1.0,
            policy_loss: losses.iter().sum::<f64>() / losses.len().max(1) as f64,
            first_ratio_error: 0.0,
            skipped_micro_batches: skipped,
            teacher_kl: None,
            final_step_reward: None,
            final_step_dmd: None,
            fake_score_loss: None,
            nonfinite_rewards: 0,
            learning_rate: c.train.learning_rate,
            peak_memory_mib: crate::train::peak_memory_mib(),
            seconds_rollout,
            seconds_reward_wait: 0.0,
            seconds_train,
        };
        Ok((metrics, grid))
    }

    fn draft_reward(&self) -> &DifferentiableReward {
        self.differentiable
            .as_ref()
            .expect("train.draft loaded its reward")
    }
}

/// Whether `dir` (the config field `field`) looks like a Shapes CLIP folder (for early, named
/// errors).
fn check_clip_dir(dir: &Path, field: &str) -> Result<(), GrpoError> {
    for file in ["config.json", "model.bpk", "tokenizer.json"] {
        if !dir.join(file).is_file() {
            return Err(run_error(
                dir,
                format!("{field}: no {file} here (make one with `portaflow train clip --out DIR`)"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn the_hinge_stops_pushing_past_the_margin() {
        let device = Device::flex();
        let r = Tensor::<1>::from_data(TensorData::new(vec![0.2f32, 0.6, 0.9], [3]), &device);
        let hinge: Vec<f32> = draft_loss(r.clone(), Some(0.55))
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!((hinge[0] - 0.35).abs() < 1e-6 && hinge[1] == 0.0 && hinge[2] == 0.0);
        let plain: Vec<f32> = draft_loss(r, None).into_data().try_to_vec().unwrap();
        assert_eq!(plain, vec![-0.2, -0.6, -0.9]);
    }
}
