//! portaflow in the browser. For now the crate proves that the engine compiles for
//! `wasm32-unknown-unknown` with burn's WebGPU device and Flex CPU fallback; the demo page with the
//! distilled 4-step model follows (issue "Browser demo").

use wasm_bindgen::prelude::*;

/// Version of the engine compiled into this module.
#[wasm_bindgen]
pub fn engine_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The Flow-GRPO sigma schedule, computed by the engine (a smoke test of the wasm build).
#[wasm_bindgen]
pub fn shifted_sigmas(steps: usize, shift: f64) -> Result<Vec<f64>, JsError> {
    portaflow::sample::schedule::Schedule::shifted(steps, shift)
        .map(|s| s.sigmas)
        .map_err(|e| JsError::new(&e.to_string()))
}
