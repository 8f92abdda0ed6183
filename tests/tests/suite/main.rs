//! The workspace's integration tests, one binary: every module shares one process, so the
//! Vulkan adapter's one-time costs (cubecl's device calibration, autotune, pipeline creation) are
//! paid once per run instead of once per file, and the test code is compiled and linked once.
//! Run one module with `cargo test --workspace --test suite grpo::`.

mod desktop_app;
mod device;
mod diffusers_pipelines;
mod distill;
mod flux1;
mod flux2;
mod flux_denoiser;
mod grpo;
mod kernels;
mod lora;
mod pipeline;
mod remote_reward;
mod sampling;
mod sd3;
mod text;
mod torch_pt;
mod vae;
mod weights;
