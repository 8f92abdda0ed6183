//! GenEval-style evaluation: generate images for every line of a prompt file (or read images laid
//! out as GenEval lays them out) and score them with the Shapes detector.
//!
//! Folder layout (GenEval's `generation/diffusers_generate.py`): `<index:05>/metadata.jsonl`
//! holding the prompt's metadata line, and `<index:05>/samples/<k:05>.png`.

use std::path::Path;

use burn::tensor::Device;

use super::{GenerateOptions, Pipeline, PipelineError};
use crate::image_io::{load_png, save_png};
use crate::world::geneval::{ImageRecord, Report};
use crate::world::prompt::{PromptSpec, parse_jsonl};
use crate::world::render::Image;

/// How to generate the evaluation images.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub images_per_prompt: usize,
    /// Images per forward batch.
    pub batch_size: usize,
    /// Template for every image; `seeds` is replaced: image k of prompt i gets
    /// `seed + i·images_per_prompt + k`.
    pub generate: GenerateOptions,
    pub seed: u64,
}

impl EvalOptions {
    /// The seed of image `sample` of prompt `index`: `seed + index·images_per_prompt + sample`.
    pub fn seed_of(&self, index: usize, sample: usize) -> u64 {
        self.seed + (index * self.images_per_prompt + sample) as u64
    }
}

/// Generates and scores every prompt; with `save`, also writes the images in GenEval's layout.
pub fn evaluate_pipeline(
    pipeline: &Pipeline,
    specs: &[PromptSpec],
    options: &EvalOptions,
    device: &Device,
    save: Option<&Path>,
    on_progress: impl FnMut(usize, usize),
) -> Result<Report, PipelineError> {
    evaluate_pipeline_with(
        pipeline,
        specs,
        options,
        device,
        save,
        on_progress,
        |_, _| {},
    )
}

/// [`evaluate_pipeline`], also handing each generated batch to `on_images` (the prompts' indices
/// into `specs`, the images) for other scorers (a training run's own rewards).
pub fn evaluate_pipeline_with(
    pipeline: &Pipeline,
    specs: &[PromptSpec],
    options: &EvalOptions,
    device: &Device,
    save: Option<&Path>,
    mut on_progress: impl FnMut(usize, usize),
    mut on_images: impl FnMut(&[usize], &[Image]),
) -> Result<Report, PipelineError> {
    let k = options.images_per_prompt;
    let jobs: Vec<(usize, usize)> = (0..specs.len())
        .flat_map(|i| (0..k).map(move |s| (i, s)))
        .collect();
    let mut records = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(options.batch_size.max(1)) {
        let prompts: Vec<String> = chunk
            .iter()
            .map(|&(i, _)| specs[i].prompt.clone())
            .collect();
        let mut generate = options.generate.clone();
        generate.seeds = chunk.iter().map(|&(i, s)| options.seed_of(i, s)).collect();
        let images = pipeline.generate(&prompts, &generate, device, |_| {}, None)?;
        let indices: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
        on_images(&indices, &images);
        for (j, (&(index, sample), image)) in chunk.iter().zip(&images).enumerate() {
            let spec = &specs[index];
            if let Some(dir) = save {
                let folder = dir.join(format!("{index:05}"));
                let samples = folder.join("samples");
                std::fs::create_dir_all(&samples).map_err(|source| {
                    crate::model::weights::LoadError::Io {
                        path: samples.clone(),
                        source,
                    }
                })?;
                let line = serde_json::to_string(spec).expect("plain data");
                std::fs::write(folder.join("metadata.jsonl"), line + "\n").map_err(|source| {
                    crate::model::weights::LoadError::Io {
                        path: folder.clone(),
                        source,
                    }
                })?;
                let seed = generate.seeds[j];
                save_png(
                    image,
                    &samples.join(format!("{sample:05}.png")),
                    &[("prompt", spec.prompt.clone()), ("seed", seed.to_string())],
                )
                .map_err(|e| PipelineError::Folder {
                    path: samples.clone(),
                    message: e.to_string(),
                })?;
            }
            records.push(score(index, sample, spec, image));
        }
        on_progress(records.len(), jobs.len());
    }
    Ok(Report::new(records))
}

/// Scores a folder of images in GenEval's layout (made by any software).
pub fn evaluate_folder(dir: &Path) -> Result<Report, PipelineError> {
    let folder_err = |path: &Path, message: String| PipelineError::Folder {
        path: path.to_path_buf(),
        message,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| folder_err(dir, e.to_string()))?;
    let mut folders: Vec<(usize, std::path::PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect();
    folders.sort();
    if folders.is_empty() {
        return Err(folder_err(
            dir,
            "no numbered prompt folders (<index>/metadata.jsonl + <index>/samples/*.png)".into(),
        ));
    }
    let mut records = Vec::new();
    for (index, folder) in folders {
        let meta = folder.join("metadata.jsonl");
        let text = std::fs::read_to_string(&meta).map_err(|e| folder_err(&meta, e.to_string()))?;
        let spec = parse_jsonl(&text, &meta.display().to_string())
            .map_err(|e| folder_err(&meta, e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| folder_err(&meta, "empty metadata file".into()))?;
        let samples = folder.join("samples");
        let mut pngs: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(&samples)
            .map_err(|e| folder_err(&samples, e.to_string()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                Some((name.strip_suffix(".png")?.parse().ok()?, e.path()))
            })
            .collect();
        pngs.sort();
        if pngs.is_empty() {
            return Err(folder_err(&samples, "no <k>.png images".into()));
        }
        for (sample, path) in pngs {
            let image = load_png(&path).map_err(|e| folder_err(&path, e.to_string()))?;
            records.push(score(index, sample, &spec, &image));
        }
    }
    Ok(Report::new(records))
}

/// Sample `sample` of prompt `index`, scored.
fn score(index: usize, sample: usize, spec: &PromptSpec, image: &Image) -> ImageRecord {
    use crate::world::{dense::score_components, detect, geneval::evaluate};
    // One detection pass gives the verdict, the artifacts and the dense score.
    let (found, named) = detect::detect_with_components(image);
    let total = (image.width * image.height) as f32;
    let verdict = evaluate(spec, &named.objects);
    ImageRecord {
        index,
        sample,
        tag: spec.tag.clone(),
        correct: verdict.correct,
        strict_correct: verdict.strict_correct,
        score: verdict.score,
        artifacts: named.artifacts.len(),
        dense: score_components(spec, &found, total),
    }
}

/// The per-tag table `portaflow eval` prints.
pub fn table(report: &Report) -> String {
    let mut out = String::from("tag              accuracy  images\n");
    for (tag, accuracy) in &report.tags {
        let n = report.images.iter().filter(|i| &i.tag == tag).count();
        out.push_str(&format!("{tag:<16} {:>7.1}%  {n:>6}\n", 100.0 * accuracy));
    }
    out.push_str(&format!(
        "{:<16} {:>7.1}%  {:>6}\n",
        "overall",
        100.0 * report.overall,
        report.images.len()
    ));
    out.push_str(&format!(
        "partial-credit score (mean) {:.3}, dense score (mean) {:.3}, artifacts per image {:.2}\n",
        report.score_mean(),
        report.dense_mean(),
        report.artifact_rate()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn foreign_renders() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/golden/foreign_renders")
    }

    /// Scenes of the test prompts drawn by Pillow (`tools/golden/make_foreign_renders.py`: its own
    /// palettes, backgrounds, proportions, anti-aliasing, 64 to 256 px), half of them broken on
    /// purpose: the verdicts must follow how each image was drawn, not our renderer's look.
    #[test]
    fn foreign_renders_score_as_drawn() {
        let truth: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(foreign_renders().join("truth.json")).unwrap(),
        )
        .unwrap();
        let correct: Vec<usize> = serde_json::from_value(truth["correct_samples"].clone()).unwrap();
        let styles: Vec<String> = serde_json::from_value(truth["styles"].clone()).unwrap();
        let prompts = parse_jsonl(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join(truth["prompts"].as_str().unwrap()),
            )
            .unwrap(),
            "test prompts",
        )
        .unwrap();
        let (mut agree, mut total) = (0, 0);
        for style in &styles {
            let report = evaluate_folder(&foreign_renders().join(style)).unwrap();
            assert_eq!(
                report.images.len(),
                prompts.len() * 2 * correct.len(),
                "{style}"
            );
            let wrong: Vec<String> = report
                .images
                .iter()
                .filter(|i| i.strict_correct != correct.contains(&i.sample))
                .map(|i| format!("{}/{} ({})", i.index, i.sample, i.tag))
                .collect();
            println!(
                "{style}: {} of {} verdicts as drawn; disagreeing: {wrong:?}",
                report.images.len() - wrong.len(),
                report.images.len()
            );
            agree += report.images.len() - wrong.len();
            total += report.images.len();
        }
        assert!(
            agree as f64 >= 0.995 * total as f64,
            "{agree} of {total} verdicts as drawn"
        );
    }

    #[test]
    fn a_broken_folder_is_named_in_the_error() {
        let dir =
            std::env::temp_dir().join(format!("portaflow-eval-folder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let err = |dir: &Path| evaluate_folder(dir).unwrap_err().to_string();
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            err(&dir).contains("no numbered prompt folders"),
            "{}",
            err(&dir)
        );

        let prompt = dir.join("00000");
        std::fs::create_dir_all(prompt.join("samples")).unwrap();
        assert!(err(&dir).contains("metadata.jsonl"), "{}", err(&dir));
        std::fs::write(
            prompt.join("metadata.jsonl"),
            r#"{"tag":"colors","include":[{"class":"circle","count":1,"color":"teal"}],"prompt":"a photo of a teal circle"}"#,
        )
        .unwrap();
        assert!(err(&dir).contains("teal"), "{}", err(&dir));
        let source = foreign_renders().join("pil_aliased_64/00000");
        std::fs::copy(source.join("metadata.jsonl"), prompt.join("metadata.jsonl")).unwrap();
        assert!(err(&dir).contains("no <k>.png images"), "{}", err(&dir));
        let png = std::fs::read(source.join("samples/00000.png")).unwrap();
        std::fs::write(prompt.join("samples/00000.png"), &png[..png.len() / 2]).unwrap();
        assert!(err(&dir).contains("00000.png"), "{}", err(&dir));
        std::fs::write(prompt.join("samples/00000.png"), &png).unwrap();
        assert_eq!(evaluate_folder(&dir).unwrap().images.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
