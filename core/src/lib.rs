//! portaflow: a portable engine that samples, adapts (LoRA) and RL-trains flow-matching
//! text-to-image models (SD3 / SD3.5 MMDiT, FLUX.1, FLUX.2-klein and small models of the same
//! architectures) on any GPU wgpu reaches and on the CPU.
//!
//! See `DESIGN.md` in the shared folder for the map of the house.

pub mod device;
pub mod image_io;
pub mod lora;
pub mod model;
pub mod pipeline;
pub mod reward;
pub mod sample;
pub mod text;
#[cfg(feature = "native")]
pub mod train;
pub mod world;
