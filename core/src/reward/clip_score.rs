//! A small CLIP-style image/text model trained contrastively on the Shapes world
//! (`portaflow train clip`), whose image–text cosine similarity is a differentiable reward
//! (DRaFT, RTDMD's final-step back-prop). The image tower is a ViT built from the same encoder
//! layer as the CLIP text model (bidirectional, exact GELU); the text tower is a
//! `CLIPTextModelWithProjection`; both project to a shared space; InfoNCE with a learned
//! temperature, as CLIP.

use std::path::Path;

use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{Reward, RewardError, Score, Task};
use crate::model::layers::{LayerNorm, Linear};
use crate::model::weights::{LoadError, Weights};
use crate::pipeline::from_images;
use crate::text::clip::{ClipEncoderLayer, ClipTextConfig, ClipTextModel};
use crate::text::tokenizer::PromptTokenizer;
use crate::world::prompt::PromptSpec;
use crate::world::render::Image;

/// The sizes of a Shapes CLIP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShapesClipConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub projection_dim: usize,
    /// The text tower (vocabulary and context from the bundled tokenizer).
    pub text: ClipTextConfig,
}

/// `vision_model.*` + `visual_projection`.
#[derive(Module, Debug)]
pub struct VisionTower {
    pub patch_embedding: Linear,
    pub class_embedding: Param<Tensor<2>>,
    pub position_embedding: Param<Tensor<2>>,
    pub pre_layrnorm: LayerNorm,
    pub layers: Vec<ClipEncoderLayer>,
    pub post_layernorm: LayerNorm,
    pub visual_projection: Linear,
}

/// Both towers and the temperature.
#[derive(Module, Debug)]
pub struct ShapesClip {
    pub vision: VisionTower,
    pub text: ClipTextModel,
    /// log of the logit scale (CLIP starts at log(1/0.07)).
    pub logit_scale: Param<Tensor<1>>,
    #[module(skip)]
    pub config: ShapesClipConfig,
}

impl ShapesClip {
    /// A fresh model drawn from the initialisation rule (seeded).
    pub fn init(config: ShapesClipConfig, seed: u64, device: &Device) -> Self {
        let mut w = Weights::initializer(seed);
        let d = config.width;
        let p = config.patch_size;
        let tokens = (config.image_size / p).pow(2);
        let mut param = |key: &str, shape: [usize; 2]| {
            let values = w.read(key, &shape).unwrap().unwrap();
            Param::from_tensor(Tensor::<2>::from_data(
                TensorData::new(values, shape),
                device,
            ))
        };
        let class_embedding = param("vision_model.embeddings.class_embedding", [1, d]);
        let position_embedding = param(
            "vision_model.embeddings.position_embedding.weight",
            [tokens + 1, d],
        );
        let eps = 1e-5;
        let layers = (0..config.layers)
            .map(|i| {
                ClipEncoderLayer::load(
                    &mut w,
                    &format!("vision_model.encoder.layers.{i}"),
                    d,
                    4 * d,
                    eps,
                    device,
                )
            })
            .collect::<Result<Vec<_>, LoadError>>()
            .expect("initialisation cannot miss a key");
        let linear = |w: &mut Weights, key: &str, d_in, d_out, bias| {
            Linear::load(w, key, d_in, d_out, bias, device).expect("initialisation")
        };
        let vision = VisionTower {
            patch_embedding: linear(
                &mut w,
                "vision_model.embeddings.patch_embedding",
                3 * p * p,
                d,
                false,
            ),
            class_embedding,
            position_embedding,
            pre_layrnorm: LayerNorm::load(&mut w, "vision_model.pre_layrnorm", d, eps, device)
                .expect("initialisation"),
            layers,
            post_layernorm: LayerNorm::load(&mut w, "vision_model.post_layernorm", d, eps, device)
                .expect("initialisation"),
            visual_projection: linear(&mut w, "visual_projection", d, config.projection_dim, false),
        };
        let text = ClipTextModel::init(config.text.clone(), seed.wrapping_add(1), device);
        let logit_scale = Param::from_tensor(Tensor::<1>::from_data(
            TensorData::new(vec![(1.0f32 / 0.07).ln()], [1]),
            device,
        ));
        Self {
            vision,
            text,
            logit_scale,
            config,
        }
    }

    /// Unit-length image embeddings.
    ///
    /// # Shapes
    /// - `pixels`: `[b, 3, H, W]` in [−1, 1] → `[b, projection_dim]`
    pub fn embed_images(&self, pixels: Tensor<4>) -> Tensor<2> {
        let [b, c, h, w] = pixels.dims();
        let p = self.config.patch_size;
        let (rows, cols) = (h / p, w / p);
        let d = self.config.width;
        // [b, c, h, w] → [b, c, rows, p, cols, p] → [b, rows, cols, c, p, p] → [b, rows·cols, c·p·p]
        let patches = pixels
            .reshape([b, c, rows, p, cols, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, rows * cols, c * p * p]);
        let tokens = self.vision.patch_embedding.forward(patches);
        let class = self
            .vision
            .class_embedding
            .val()
            .unsqueeze::<3>()
            .expand([b, 1, d]);
        let x = Tensor::cat(vec![class, tokens], 1)
            + self.vision.position_embedding.val().unsqueeze::<3>();
        let mut x = self.vision.pre_layrnorm.forward(x);
        for layer in &self.vision.layers {
            x = layer.forward(x, self.config.heads, false, false);
        }
        // The mean of the patch tokens, not CLIP's class token: on flat scenes a fresh class
        // token barely tells images apart (embedding variance 1e-4 against 1e-2 for text).
        // What keeps training from collapsing to uniform logits is `train_clip`'s warm-up.
        // [b, 1+n, d] → [b, n, d] → [b, 1, d] → [b, d]
        let n = x.dims()[1];
        let pooled = self
            .vision
            .post_layernorm
            .forward(x.slice([0..b, 1..n, 0..d]).mean_dim(1).reshape([b, d]));
        normalize(self.vision.visual_projection.forward(pooled))
    }

    /// Unit-length text embeddings of tokenised prompts → `[b, projection_dim]`.
    pub fn embed_texts(&self, ids: &[Vec<u32>], device: &Device) -> Tensor<2> {
        normalize(self.text.forward(ids, device).pooled)
    }

    /// CLIP's symmetric InfoNCE on a batch of matching pairs (pair i is image i with text i).
    pub fn contrastive_loss(&self, images: Tensor<2>, texts: Tensor<2>) -> Tensor<1> {
        let b = images.dims()[0];
        let device = images.device();
        let scale = self.logit_scale.val().exp().reshape([1, 1]);
        // [b, k] · [k, b] → [b, b]
        let logits = images.matmul(texts.transpose()) * scale;
        let diagonal = Tensor::<2, Int>::from_data(
            TensorData::new((0..b as i64).collect::<Vec<_>>(), [b, 1]),
            &device,
        );
        let rows = log_softmax(logits.clone(), 1).gather(1, diagonal.clone());
        let cols = log_softmax(logits.transpose(), 1).gather(1, diagonal);
        (rows.mean() + cols.mean()).neg() * 0.5
    }

    pub fn save(&self, dir: &Path) -> Result<(), LoadError> {
        let io = |source| LoadError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let text = serde_json::to_string_pretty(&self.config).expect("config serialises");
        std::fs::write(dir.join("config.json"), text).map_err(io)?;
        self.clone()
            .save_file(dir.join("model.bpk"))
            .map_err(|e| LoadError::Config {
                path: dir.join("model.bpk"),
                message: e.to_string(),
            })
    }

    /// [`ShapesClip::load`] and the `tokenizer.json` `portaflow train clip` saves beside it.
    pub fn load_with_tokenizer(
        dir: &Path,
        device: &Device,
    ) -> Result<(Self, PromptTokenizer), LoadError> {
        let model = Self::load(dir, device)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = PromptTokenizer::from_file(
            &path,
            model.config.text.max_position_embeddings,
            crate::text::tokenizer::PAD,
        )
        .map_err(|e| LoadError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok((model, tokenizer))
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self, LoadError> {
        let config: ShapesClipConfig = crate::model::read_config(&dir.join("config.json"))?;
        Self::init(config, 0, device)
            .try_load_file(dir.join("model.bpk"))
            .map_err(|e| LoadError::Config {
                path: dir.join("model.bpk"),
                message: format!("cannot read the weights: {e}"),
            })
    }
}

/// Rows scaled to unit length.
fn normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-8);
    x / norm
}

/// What `train_clip` reports every `log_every` steps.
#[derive(Clone, Debug, Serialize)]
pub struct ClipLog {
    pub step: usize,
    pub loss: f64,
    /// Fraction of images whose best-scoring caption in the batch is their own.
    pub accuracy: f64,
}

/// Trains `model` for `steps` batches of `batch` rendered Shapes scenes and their captions
/// (prompts of `train`, drawn as pretraining draws them), with AdamW at `lr`.
#[allow(clippy::too_many_arguments)]
pub fn train_clip(
    mut model: ShapesClip,
    tokenizer: &PromptTokenizer,
    train: &[PromptSpec],
    steps: usize,
    batch: usize,
    lr: f64,
    seed: u64,
    device: &Device,
    mut on_log: impl FnMut(&ClipLog),
) -> Result<ShapesClip, RewardError> {
    let config = crate::train::pretrain::PretrainConfig {
        digits_fraction: 0.0,
        ..Default::default()
    };
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.01).init();
    let size = model.config.image_size;
    for step in 0..steps {
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9E37));
        let (prompts, images): (Vec<String>, Vec<Image>) = (0..batch)
            .map(|_| crate::train::pretrain::example(&mut rng, train, size, &config))
            .unzip();
        let ids = tokenizer
            .encode(&prompts)
            .map_err(|e| RewardError::Config(e.to_string()))?;
        let image_emb = model.embed_images(from_images(&images, device));
        let text_emb = model.embed_texts(&ids, device);
        let same = |i: usize, j: usize| prompts[i] == prompts[j];
        let loss = model.contrastive_loss(image_emb.clone(), text_emb.clone());
        let loss_value = loss.clone().into_scalar::<f32>() as f64;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // Linear warm-up over the first 100 steps (CLIP's recipe).
        let warm = ((step + 1) as f64 / 100.0).min(1.0);
        model = optimizer.step(lr * warm, model, grads);
        let similarity: Vec<f32> = image_emb
            .matmul(text_emb.transpose())
            .into_data()
            .try_to_vec()
            .expect("f32");
        // A caption equal to the image's own counts as right (batches repeat prompts).
        let correct = (0..batch)
            .filter(|&i| {
                let row = &similarity[i * batch..(i + 1) * batch];
                let best = (0..batch)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap_or(i);
                same(i, best)
            })
            .count();
        on_log(&ClipLog {
            step: step + 1,
            loss: loss_value,
            accuracy: correct as f64 / batch as f64,
        });
    }
    Ok(model)
}

/// The CLIP score as a reward: cosine similarity of image and prompt embeddings (in [−1, 1]).
pub struct ClipScoreReward {
    pub model: ShapesClip,
    pub tokenizer: PromptTokenizer,
    pub device: Device,
}

impl Reward for ClipScoreReward {
    fn name(&self) -> &str {
        "clip-score"
    }

    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        let prompts: Vec<String> = tasks.iter().map(|t| t.prompt().to_string()).collect();
        let ids = self
            .tokenizer
            .encode(&prompts)
            .map_err(|e| RewardError::Config(e.to_string()))?;
        let image_emb = self.model.embed_images(from_images(images, &self.device));
        let text_emb = self.model.embed_texts(&ids, &self.device);
        let cosine: Vec<f32> = (image_emb * text_emb)
            .sum_dim(1)
            .into_data()
            .try_to_vec()
            .expect("f32");
        Ok(cosine
            .into_iter()
            .map(|c| {
                Some(Score {
                    reward: c,
                    success: false,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Pipeline, text::TextStack};

    #[test]
    fn contrastive_training_learns_to_match_scenes_and_captions() {
        let device = Device::flex();
        let pipe = Pipeline::from_dir(&crate::pipeline::bundled_dir(), &device).unwrap();
        let TextStack::Clip(encoder) = &pipe.text else {
            panic!("the bundled model has one CLIP text encoder")
        };
        let text = ClipTextConfig {
            hidden_size: 64,
            intermediate_size: 128,
            projection_dim: 32,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            ..encoder.model.config.clone()
        };
        let config = ShapesClipConfig {
            image_size: 64,
            patch_size: 8,
            width: 64,
            layers: 1,
            heads: 2,
            projection_dim: 32,
            text,
        };
        let (train, _) = crate::world::prompt_sets::build();
        let ad = device.clone().autodiff();
        let model = ShapesClip::init(config, 3, &ad);
        let mut logs = Vec::new();
        let model = train_clip(
            model,
            &encoder.tokenizer,
            &train,
            500,
            16,
            1e-3,
            1,
            &ad,
            |l| logs.push(l.clone()),
        )
        .unwrap();
        let mean = |part: &[ClipLog], f: fn(&ClipLog) -> f64| {
            part.iter().map(f).sum::<f64>() / part.len() as f64
        };
        let (first, last) = (&logs[..20], &logs[480..]);
        let (l0, l1) = (mean(first, |l| l.loss), mean(last, |l| l.loss));
        let (a0, a1) = (mean(first, |l| l.accuracy), mean(last, |l| l.accuracy));
        assert!(l1 < l0 - 0.3, "loss {l0:.3} → {l1:.3}");
        assert!(a1 > a0 + 0.1 && a1 > 0.25, "accuracy {a0:.3} → {a1:.3}");

        // Saved and loaded, it scores the same; a matching caption scores above a wrong one.
        let dir = std::env::temp_dir().join(format!("pf-clip-{}", std::process::id()));
        model.save(&dir).unwrap();
        let reward = ClipScoreReward {
            model: ShapesClip::load(&dir, &device).unwrap(),
            tokenizer: encoder.tokenizer.clone(),
            device: device.clone(),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let pre = crate::train::pretrain::PretrainConfig {
            digits_fraction: 0.0,
            ..Default::default()
        };
        let (prompt, image) = crate::train::pretrain::example(&mut rng, &train, 64, &pre);
        let other = train.iter().find(|s| s.prompt != prompt).unwrap();
        let tasks = [
            Task::Shapes(train.iter().find(|s| s.prompt == prompt).unwrap().clone()),
            Task::Shapes(other.clone()),
        ];
        let scores = reward.score(&[image.clone(), image], &tasks).unwrap();
        let (own, wrong) = (scores[0].unwrap().reward, scores[1].unwrap().reward);
        assert!((-1.0..=1.0).contains(&own) && own.is_finite() && wrong.is_finite());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
