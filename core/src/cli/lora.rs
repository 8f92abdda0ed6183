//! `portaflow lora inspect | convert | merge`, and the `--lora PATH[:WEIGHT]` option of the
//! commands that generate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use portaflow::device::{self, DeviceRequest};
use portaflow::lora::{AdapterSampling, Format, LoraWeights, SAMPLING_FILE};
use portaflow::pipeline::{self, Pipeline};

#[derive(clap::Subcommand)]
pub enum LoraCommand {
    /// Format, components, ranks, alphas, targets and parameter count of an adapter.
    Inspect {
        /// A PEFT folder, a diffusers or kohya .safetensors, or a torch .pt state dict.
        path: PathBuf,
    },
    /// Rewrite an adapter as a PEFT folder (OUT is a folder) or a diffusers file (OUT ends in
    /// .safetensors).
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// α for adapters whose file carries none (torch state dicts; diffusers files without
        /// metadata): the scaling becomes α/r.
        #[arg(long)]
        alpha: Option<f64>,
    },
    /// Combine adapters into one whose ΔW is Σ weight·ΔW exactly (weights 1/n: Flow-OPD's cold
    /// start from several teachers). OUT is a PEFT folder, or a diffusers .safetensors file.
    Combine {
        /// Adapters, `PATH[:WEIGHT]` (default weight 1/number of adapters); repeat for several.
        #[arg(long = "lora", required = true)]
        loras: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// Average the A and the B factors separately instead, as Flow-OPD's released code does
        /// (not ΔW's average); prints how far its ΔW is from the exact one.
        #[arg(long)]
        average_factors: bool,
        /// Give OUT this folder's `sampling.json` (a student stacked with its RL stage samples as
        /// that stage ran); without it the card is copied only when every adapter has the same.
        #[arg(long, value_name = "DIR")]
        sampling_from: Option<PathBuf>,
    },
    /// Fold adapters into the base weights and write a new pipeline folder.
    Merge {
        /// The pipeline folder (default: the bundled model).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Adapters in order, `PATH[:WEIGHT]`; repeat for several.
        #[arg(long = "lora", required = true)]
        loras: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(request: DeviceRequest, command: LoraCommand) -> Result<()> {
    match command {
        LoraCommand::Inspect { path } => inspect(&path),
        LoraCommand::Convert {
            input,
            output,
            alpha,
        } => convert(&input, &output, alpha),
        LoraCommand::Combine {
            loras,
            out,
            average_factors,
            sampling_from,
        } => combine(&loras, &out, average_factors, sampling_from.as_deref()),
        LoraCommand::Merge { model, loras, out } => {
            let chosen = device::select(request)?;
            let dir = model.unwrap_or_else(pipeline::bundled_dir);
            let mut pipe = Pipeline::from_dir(&dir, &chosen.device)
                .with_context(|| format!("loading the model from {}", dir.display()))?;
            let names = apply(&mut pipe, &loras, &chosen.device, true)?;
            pipe.save_dir(&out)?;
            println!(
                "merged {} adapter(s) into {} → {}",
                names.len(),
                dir.display(),
                out.display()
            );
            Ok(())
        }
    }
}

/// `PATH[:WEIGHT]`: the weight is what follows the last colon when it parses as a number.
pub fn parse_spec(spec: &str) -> Result<(PathBuf, f64)> {
    let (path, weight) = split_spec(spec)?;
    Ok((path, weight.unwrap_or(1.0)))
}

/// `PATH[:WEIGHT]` with the weight absent when none is written.
fn split_spec(spec: &str) -> Result<(PathBuf, Option<f64>)> {
    if let Some((path, weight)) = spec.rsplit_once(':')
        && let Ok(weight) = weight.parse::<f64>()
    {
        anyhow::ensure!(weight.is_finite(), "--lora {spec}: weight is not finite");
        return Ok((PathBuf::from(path), Some(weight)));
    }
    Ok((PathBuf::from(spec), None))
}

/// Reads and attaches `--lora` adapters in order, named `lora0`, `lora1`, …; with `merge`, folds
/// them into the base weights (sampling with fixed adapters needs no side path).
pub fn apply(
    pipe: &mut Pipeline,
    specs: &[String],
    device: &Device,
    merge: bool,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (path, weight) = parse_spec(spec)?;
        let weights = LoraWeights::read(&path)?;
        if weights.configs.is_empty() && weights.format == Format::TorchPt {
            eprintln!(
                "note: {} carries no α; using α = r (scale 1). Give it one with `portaflow lora convert --alpha`.",
                path.display()
            );
        }
        let name = format!("lora{i}");
        let count = pipe
            .add_lora(&weights, &name, weight, device)
            .with_context(|| format!("applying {}", path.display()))?;
        eprintln!(
            "{}: {} on {count} linears, weight {weight}",
            path.display(),
            weights.format
        );
        names.push(name);
    }
    if merge {
        for name in &names {
            pipe.merge_lora(name)?;
        }
    }
    Ok(names)
}

fn inspect(path: &Path) -> Result<()> {
    let weights = LoraWeights::read(path)?;
    println!("{}", path.display());
    println!("  format:     {}", weights.format);
    println!("  components: {}", weights.components().join(", "));
    println!("  modules:    {}", weights.modules.len());
    println!("  parameters: {}", weights.parameter_count());
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for m in weights.modules.values() {
        *by.entry(format!(
            "rank {:>3}  alpha {:>7}  scaling {:.4}",
            m.rank, m.alpha, m.scaling
        ))
        .or_default() += 1;
    }
    for (line, count) in by {
        println!("  {line}  × {count}");
    }
    // Targets as PEFT would list them: the last path segment(s) after the block index.
    let mut targets: BTreeMap<String, usize> = BTreeMap::new();
    for path in weights.modules.keys() {
        *targets.entry(target_name(path)).or_default() += 1;
    }
    let shown: Vec<String> = targets.iter().map(|(t, c)| format!("{t} ×{c}")).collect();
    println!("  targets:    {}", shown.join(", "));
    for (component, config) in &weights.configs {
        println!(
            "  {component} config: r {}, lora_alpha {}, rslora {}, target_modules {}",
            config.r,
            config.lora_alpha,
            config.use_rslora,
            config.targets_text()
        );
    }
    Ok(())
}

/// `transformer.transformer_blocks.3.attn.to_out.0` → `attn.to_out.0`: what follows the block index.
fn target_name(path: &str) -> String {
    let segments: Vec<&str> = path.split('.').collect();
    let start = segments
        .iter()
        .position(|s| s.parse::<usize>().is_ok())
        .map_or(1, |i| i + 1);
    segments[start.min(segments.len() - 1)..].join(".")
}

fn combine(
    specs: &[String],
    out: &Path,
    average_factors: bool,
    sampling_from: Option<&Path>,
) -> Result<()> {
    let mut read = Vec::new();
    let mut cards = Vec::new();
    for spec in specs {
        let (path, weight) = split_spec(spec)?;
        // No weight given: an equal share.
        let weight = weight.unwrap_or(1.0 / specs.len() as f64);
        read.push((LoraWeights::read(&path)?, weight));
        cards.push(AdapterSampling::read(&path).map_err(anyhow::Error::msg)?);
    }
    // The card OUT gets: the named folder's, else the one every adapter shares (students of one
    // recipe); decided before anything is written.
    let card = match sampling_from {
        Some(dir) => {
            let card = AdapterSampling::read(dir)
                .map_err(anyhow::Error::msg)?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--sampling-from {}: no {SAMPLING_FILE} there",
                        dir.display()
                    )
                })?;
            if is_diffusers_file(out) {
                bail!(
                    "--sampling-from needs OUT to be a PEFT folder ({} is a diffusers file, which has no place for {SAMPLING_FILE})",
                    out.display()
                );
            }
            Some((card, format!("{}'s", dir.display())))
        }
        None => match cards.first() {
            Some(Some(card))
                if !is_diffusers_file(out) && cards.iter().all(|c| c.as_ref() == Some(card)) =>
            {
                Some((
                    card.clone(),
                    "every adapter's card is the same; copied".into(),
                ))
            }
            _ => None,
        },
    };
    let parts: Vec<(&LoraWeights, f64)> = read.iter().map(|(w, x)| (w, *x)).collect();
    let exact = LoraWeights::sum_of_deltas(&parts)?;
    let combined = if average_factors {
        let approx = LoraWeights::average_of_factors(&parts)?;
        let (mut err, mut norm) = (0f64, 0f64);
        for path in exact.modules.keys() {
            let (e, a) = (exact.delta(path).unwrap(), approx.delta(path).unwrap());
            err += e
                .iter()
                .zip(&a)
                .map(|(e, a)| ((e - a) as f64).powi(2))
                .sum::<f64>();
            norm += e.iter().map(|e| (*e as f64).powi(2)).sum::<f64>();
        }
        println!(
            "factor averaging: ‖ΔW − exact ΔW‖ / ‖exact ΔW‖ = {:.4} over {} modules",
            (err / norm.max(f64::MIN_POSITIVE)).sqrt(),
            exact.modules.len()
        );
        approx
    } else {
        exact
    };
    write_adapter(&combined, out)?;
    match card {
        Some((card, source)) => {
            card.write(out)
                .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            println!(
                "{SAMPLING_FILE}: {source} ({} at σ {:?}, CFG {})",
                card.sampler, card.sigmas, card.guidance_scale
            );
        }
        None if cards.iter().any(Option::is_some) => println!(
            "{SAMPLING_FILE}: not written (the adapters' cards differ, some have none, or OUT is a file); sample with explicit flags or --sampling-from"
        ),
        None => {}
    }
    let ranks: std::collections::BTreeSet<usize> =
        combined.modules.values().map(|m| m.rank).collect();
    println!(
        "{} adapter(s) → {} ({} modules, rank {:?})",
        specs.len(),
        out.display(),
        combined.modules.len(),
        ranks
    );
    Ok(())
}

/// Whether `out` names a diffusers `.safetensors` file (else a PEFT folder).
fn is_diffusers_file(out: &Path) -> bool {
    out.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// Writes a diffusers file when `out` ends in `.safetensors`, else a PEFT folder (one component).
fn write_adapter(weights: &LoraWeights, out: &Path) -> Result<()> {
    if is_diffusers_file(out) {
        weights.write_diffusers(out)?;
    } else {
        let components = weights.components();
        anyhow::ensure!(
            components.len() == 1,
            "a PEFT folder holds one component; this adapter has {components:?}: write a diffusers .safetensors instead"
        );
        weights.write_peft(out, &components[0])?;
    }
    Ok(())
}

fn convert(input: &Path, output: &Path, alpha: Option<f64>) -> Result<()> {
    let mut weights = LoraWeights::read(input)?;
    if let Some(alpha) = alpha {
        anyhow::ensure!(
            weights.configs.is_empty(),
            "{} has its own config; --alpha only fills in a missing α",
            input.display()
        );
        weights = weights.with_alpha(alpha);
    }
    write_adapter(&weights, output).with_context(|| format!("converting {}", input.display()))?;
    println!(
        "{} → {} ({})",
        input.display(),
        output.display(),
        weights.format
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use portaflow::lora::LoraModule;
    use portaflow::sample::step::StepKind;

    /// A rank-1 adapter on one 2 → 2 module, with an optional card.
    fn adapter(dir: &Path, b: f32, card: Option<&AdapterSampling>) {
        let module = LoraModule {
            rank: 1,
            d_in: 2,
            d_out: 2,
            a: vec![1.0, 0.5],
            b: vec![b, -b],
            alpha: 1.0,
            scaling: 1.0,
        };
        let modules = vec![("transformer_blocks.0.attn.to_q".to_string(), module)];
        LoraWeights::from_component("transformer", modules, None)
            .write_peft(dir, "transformer")
            .unwrap();
        if let Some(card) = card {
            card.write(dir).unwrap();
        }
    }

    /// Equal cards are copied; differing ones are not, unless `--sampling-from` names the card
    /// (a student stacked with its RL stage); a folder without one is named before OUT exists.
    #[test]
    fn the_combined_adapters_card_is_the_shared_one_or_the_one_named() {
        let root = std::env::temp_dir().join(format!("pf-combine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let sigmas = [1.0, 0.75, 0.5, 0.25];
        let euler = AdapterSampling::new(StepKind::Euler, &sigmas, 1.0);
        let cps = AdapterSampling::new(StepKind::Cps { eta: 0.9 }, &sigmas, 1.0);
        let (student, rl, plain) = (root.join("student"), root.join("rl"), root.join("plain"));
        adapter(&student, 0.1, Some(&euler));
        adapter(&rl, 0.2, Some(&cps));
        adapter(&plain, 0.3, None);
        let spec = |d: &Path| format!("{}:1", d.display());
        let card = |d: &Path| AdapterSampling::read(d).unwrap();

        let same = root.join("same");
        combine(&[spec(&student), spec(&student)], &same, false, None).unwrap();
        assert_eq!(card(&same), Some(euler.clone()));
        let differ = root.join("differ");
        combine(&[spec(&student), spec(&rl)], &differ, false, None).unwrap();
        assert_eq!(card(&differ), None);
        let named = root.join("named");
        combine(&[spec(&student), spec(&rl)], &named, false, Some(&rl)).unwrap();
        assert_eq!(card(&named), Some(cps));
        // ΔW is the exact sum: rank 1 + 1.
        let sum = LoraWeights::read(&named).unwrap();
        assert_eq!(sum.modules.values().next().unwrap().rank, 2);

        let missing = root.join("missing");
        let err = combine(&[spec(&student), spec(&rl)], &missing, false, Some(&plain))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--sampling-from") && err.contains("plain") && err.contains(SAMPLING_FILE),
            "{err}"
        );
        assert!(!missing.exists());
        let file = root.join("sum.safetensors");
        let err = combine(&[spec(&student)], &file, false, Some(&rl))
            .unwrap_err()
            .to_string();
        assert!(err.contains("PEFT folder"), "{err}");
        assert!(!file.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
