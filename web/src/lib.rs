//! portaflow in the browser: the bundled model's pipeline compiled to wasm, on the visitor's
//! GPU through WebGPU, or on burn's Flex CPU backend when WebGPU is missing or fails. The page
//! (`web/www/`) fetches the model's files, checks them against `manifest.json`, hands them to
//! [`Engine::add_file`], then calls [`Engine::generate`]. Readback is asynchronous (browsers
//! cannot block on the GPU).

use std::collections::BTreeMap;
use std::rc::Rc;

use burn::tensor::Device;
use portaflow::lora::{self, LoraWeights};
use portaflow::pipeline::{self, GenerateOptions, Pipeline};
use portaflow::sample::schedule::{RTDMD_TIMESTEPS, timestep_sigmas};
use portaflow::sample::step::StepKind;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    /// The page's `window.portaflowPanic(message)`: shows the message instead of a blank page.
    #[wasm_bindgen(js_namespace = window, js_name = portaflowPanic)]
    fn report_panic(message: &str);
}

/// Runs when the module is instantiated: a panic reaches the page, not only the console.
#[wasm_bindgen(start)]
pub fn on_start() {
    std::panic::set_hook(Box::new(|info| report_panic(&info.to_string())));
}

/// Version of the engine compiled into this module.
#[wasm_bindgen]
pub fn engine_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The files a page must fetch, relative to the model folder.
#[wasm_bindgen]
pub fn model_files() -> Vec<String> {
    pipeline::memory::BUNDLED_FILES
        .iter()
        .map(|f| f.to_string())
        .collect()
}

/// The few-step student's adapter (a PEFT folder), beside the model's files in the manifest.
pub const STUDENT_FILES: [&str; 2] = [
    "student/adapter_config.json",
    "student/adapter_model.safetensors",
];

/// How the student samples (`lora::AdapterSampling`); without it, RTDMD's 4 CPS steps.
pub const STUDENT_SAMPLING: &str = "student/sampling.json";

/// Files a model has only sometimes (a latent model's autoencoder, the few-step student's
/// adapter and its sampling card): fetched when the manifest lists them.
#[wasm_bindgen]
pub fn optional_model_files() -> Vec<String> {
    pipeline::memory::AUTOENCODER_FILES
        .iter()
        .chain(&STUDENT_FILES)
        .chain(&[STUDENT_SAMPLING])
        .map(|f| f.to_string())
        .collect()
}

/// The device, the fetched files, and the pipeline once loaded.
#[wasm_bindgen]
pub struct Engine {
    device: Device,
    label: String,
    /// Why WebGPU was not used, when it was asked for and the CPU runs instead.
    fallback_reason: Option<String>,
    files: BTreeMap<String, Vec<u8>>,
    pipeline: Option<Rc<Pipeline>>,
    /// Whether the few-step student's adapter is merged into the loaded model.
    student: bool,
    /// How the student samples.
    student_sampling: Option<lora::AdapterSampling>,
}

#[wasm_bindgen]
impl Engine {
    /// Starts a device: `"webgpu"` tries WebGPU and falls back to the CPU (saying why), `"cpu"`
    /// uses the CPU.
    pub async fn start(want: String) -> Engine {
        let cpu = |reason: Option<String>| Engine {
            device: Device::flex(),
            label: "CPU (burn Flex, wasm)".into(),
            fallback_reason: reason,
            files: BTreeMap::new(),
            pipeline: None,
            student: false,
            student_sampling: None,
        };
        if want != "webgpu" {
            return cpu(None);
        }
        match Device::wgpu_options()
            .graphics_api(burn::tensor::wgpu::WgpuBackend::WebGpu)
            .init_with_setup_async()
            .await
        {
            Ok((device, setup)) => {
                let info = setup.adapter.get_info();
                let name = if info.name.is_empty() {
                    "browser adapter".to_string()
                } else {
                    info.name
                };
                Engine {
                    device,
                    label: format!("WebGPU ({name})"),
                    fallback_reason: None,
                    files: BTreeMap::new(),
                    pipeline: None,
                    student: false,
                    student_sampling: None,
                }
            }
            Err(e) => cpu(Some(format!("WebGPU is not available here ({e})"))),
        }
    }

    /// Where generation runs, e.g. "WebGPU (SwiftShader Device)" or "CPU (burn Flex, wasm)".
    pub fn device(&self) -> String {
        self.label.clone()
    }

    /// Why the CPU runs although WebGPU was asked for.
    pub fn fallback_reason(&self) -> Option<String> {
        self.fallback_reason.clone()
    }

    /// Hands over one fetched file (`name` relative to the model folder).
    pub fn add_file(&mut self, name: String, bytes: Vec<u8>) {
        self.files.insert(name, bytes);
    }

    /// Builds the pipeline from the files added, with the few-step student's adapter merged in
    /// when both its files were added; the error names a missing or corrupt file.
    pub fn load(&mut self) -> Result<(), JsError> {
        let mut files = std::mem::take(&mut self.files);
        let [config, weights] = STUDENT_FILES.map(|name| files.remove(name));
        let card = files.remove(STUDENT_SAMPLING);
        let error = |e: &dyn std::fmt::Display| JsError::new(&e.to_string());
        let mut pipeline = Pipeline::from_memory(files, &self.device).map_err(|e| error(&e))?;
        self.student = match (config, weights) {
            (Some(config), Some(weights)) => {
                let config = String::from_utf8(config)
                    .map_err(|_| JsError::new("student/adapter_config.json is not UTF-8"))?;
                let adapter = LoraWeights::from_peft_bytes(&config, weights)
                    .map_err(|e| error(&format!("the student adapter: {e}")))?;
                pipeline
                    .add_lora(&adapter, "student", 1.0, &self.device)
                    .map_err(|e| error(&format!("the student adapter: {e}")))?;
                // Merged: sampling costs what the base model's does.
                lora::merge(&mut pipeline.transformer, "student").map_err(|e| error(&e))?;
                true
            }
            (None, None) => false,
            _ => return Err(JsError::new("the student adapter needs both of its files")),
        };
        self.student_sampling = match (self.student, card) {
            (false, _) => None,
            (true, Some(card)) => {
                let text = String::from_utf8(card)
                    .map_err(|_| JsError::new("student/sampling.json is not UTF-8"))?;
                Some(lora::AdapterSampling::from_json(&text).map_err(|e| error(&e))?)
            }
            // An AC-DMD student from before the card: RTDMD's σ list with CPS η 0.9.
            (true, None) => Some(lora::AdapterSampling::new(
                StepKind::Cps { eta: 0.9 },
                &timestep_sigmas(&RTDMD_TIMESTEPS, pipeline.scheduler.shift),
                1.0,
            )),
        };
        self.pipeline = Some(Rc::new(pipeline));
        Ok(())
    }

    /// The student's sampler ("euler" or "cps"); empty without a student.
    pub fn student_sampler(&self) -> String {
        self.student_sampling
            .as_ref()
            .map_or(String::new(), |c| c.sampler.clone())
    }

    /// The student's steps (its model calls per image); 0 without a student.
    pub fn student_steps(&self) -> u32 {
        self.student_sampling
            .as_ref()
            .map_or(0, |c| c.sigmas.len() as u32)
    }

    /// Whether the loaded model is the few-step student (sample it with [`Engine::student_sampler`]
    /// at [`Engine::student_steps`], CFG 1).
    pub fn has_student(&self) -> bool {
        self.student
    }

    /// Image side in pixels.
    pub fn resolution(&self) -> Result<u32, JsError> {
        Ok(self.loaded()?.resolution() as u32)
    }

    fn loaded(&self) -> Result<&Rc<Pipeline>, JsError> {
        self.pipeline
            .as_ref()
            .ok_or_else(|| JsError::new("the model is not loaded yet"))
    }

    /// One image as RGBA bytes (`resolution()`² × 4), resolving a Promise. `sampler` is "euler"
    /// or "cps" (η 0.9, the few-step sampler); the same settings and seed give the native
    /// engine's image (`portaflow generate --sampler … --seed …`). With the student loaded, its
    /// step count samples at its own σ list (`--sigmas 1,0.75,0.5,0.25` natively).
    pub fn generate(
        &self,
        prompt: String,
        seed: u32,
        steps: u32,
        cfg: f64,
        sampler: String,
    ) -> Result<js_sys::Promise, JsError> {
        let pipeline = self.loaded()?.clone();
        let device = self.device.clone();
        let student_sigmas = self
            .student_sampling
            .as_ref()
            .filter(|c| c.sigmas.len() == steps as usize)
            .map(|c| c.sigmas.clone());
        let kind = match sampler.as_str() {
            "euler" => StepKind::Euler,
            "cps" => StepKind::Cps { eta: 0.9 },
            other => return Err(JsError::new(&format!("unknown sampler {other}"))),
        };
        if !(1..=100).contains(&steps) || !(cfg.is_finite() && (1.0..=30.0).contains(&cfg)) {
            return Err(JsError::new("steps must be 1–100 and CFG 1–30"));
        }
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            let mut options = GenerateOptions::euler(steps as usize, cfg, vec![seed as u64]);
            options.kind = kind;
            // The student was distilled at its σ list, not at the scheduler's steps.
            options.sigmas = student_sigmas;
            let latents = pipeline
                .generate_latents(&[prompt], &options, &device, |_| {}, None)
                .map_err(|e| JsError::new(&e.to_string()))?;
            let data = pipeline
                .decode(latents)
                .into_data_async()
                .await
                .map_err(|e| JsError::new(&format!("reading the image back failed: {e:?}")))?;
            let image = pipeline::images_from_data(data)
                .into_iter()
                .next()
                .expect("one image");
            let rgba: Vec<u8> = image
                .pixels
                .iter()
                .flat_map(|[r, g, b]| [*r, *g, *b, 255])
                .collect();
            Ok(js_sys::Uint8Array::from(rgba.as_slice()).into())
        }))
    }
}
