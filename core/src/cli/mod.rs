//! Subcommands of the `portaflow` binary that have grown past a function in `main.rs`.

pub mod bench;
pub mod distill;
pub mod lora;
pub mod train;
