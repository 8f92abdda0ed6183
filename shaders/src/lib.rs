//! Hand-written WGSL kernels for portaflow, launched on burn's CubeCL (wgpu) tensors.
//!
//! Each kernel lives in `wgsl/<name>.wgsl` as a template (`{{ name }}` placeholders), is listed in
//! [`KERNELS`] so the naga validation test sees every one of them, and has a Rust launcher that
//! runs it on the same device and queue as the burn tensors it reads (burn's backend-extension
//! mechanism: an op of a `#[backend_extension(Cube, Fusion)]` trait implemented for
//! `CubeBackend`).
//!
//! Every kernel keeps an equality test against the plain burn-tensor implementation of the same
//! formula (`tests/tests/kernels.rs`).

mod joint_attention;
mod norm_modulate;
mod sde_step;

pub use joint_attention::{AttentionOptions, MAX_HEAD_DIM, joint_attention};
pub use norm_modulate::norm_modulate;
pub use sde_step::{SdeStepOutput, flow_sde_step};

/// Errors from launching a hand-written kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "{kernel}: needs a wgpu (CubeCL) device, but the tensors live on {device}; use the plain tensor implementation there"
    )]
    NotCubeDevice {
        kernel: &'static str,
        device: String,
    },
    #[error("{kernel}: expected f32 tensors, found {found}")]
    DType { kernel: &'static str, found: String },
    #[error("{kernel}: input `{input}` has shape {found:?}, expected {expected:?}")]
    Shape {
        kernel: &'static str,
        input: &'static str,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{kernel}: {message}")]
    Invalid {
        kernel: &'static str,
        message: String,
    },
}

/// The most workgroups one dispatch dimension takes (WebGPU's default limit).
const MAX_GROUPS_PER_DIM: usize = 65_535;

/// Launches a hand-written kernel with bindings `inputs`, then `params` (one f32 buffer; integer
/// values bit-cast into it), then `outputs`, over `groups` workgroups of `workgroup_size` lanes.
/// Beyond 65535 the groups wrap into y: the kernel numbers its workgroup
/// `workgroup.x + workgroup.y * num_workgroups.x`, and the surplus of the last row must write
/// nothing.
pub(crate) fn launch(
    client: &cubecl::client::Client,
    kernel: impl burn_cubecl::template::KernelSource + 'static,
    workgroup_size: u32,
    groups: usize,
    inputs: Vec<cubecl::server::BufferBinding>,
    params: &[f32],
    outputs: Vec<cubecl::server::BufferBinding>,
) {
    let bytes: Vec<u8> = params.iter().flat_map(|p| p.to_le_bytes()).collect();
    let params = client.create_from_slice(&bytes);
    let mut buffers = inputs;
    buffers.push(params.binding());
    buffers.extend(outputs);
    let groups_x = groups.clamp(1, MAX_GROUPS_PER_DIM);
    let groups_y = groups.div_ceil(groups_x).max(1);
    client.launch(
        Box::new(burn_cubecl::template::SourceKernel::new(
            kernel,
            cubecl::prelude::CubeDim::new_1d(workgroup_size),
        )),
        cubecl::prelude::CubeCount::Static(groups_x as u32, groups_y as u32, 1),
        cubecl::server::KernelArguments::new().with_buffers(buffers),
    );
}

/// An integer kernel parameter, bit-cast into the f32 parameter buffer.
pub(crate) fn bits(value: usize) -> f32 {
    f32::from_bits(value as u32)
}

/// A kernel source for burn's template mechanism: `$source` (a unit struct) fills the
/// `workgroup_size` of `$template` with `$workgroup_size`.
macro_rules! wgsl_kernel_source {
    ($source:ident, $template:expr, $workgroup_size:expr) => {
        struct $source;

        impl burn_cubecl::template::KernelSource for $source {
            fn source(&self) -> burn_cubecl::template::SourceTemplate {
                burn_cubecl::template::SourceTemplate::new($template.source)
                    .register("workgroup_size", $workgroup_size.to_string())
            }

            fn id(&self) -> cubecl::prelude::KernelId {
                cubecl::prelude::KernelId::new::<Self>().info($workgroup_size)
            }

            fn lang(&self) -> &'static str {
                "wgsl"
            }
        }
    };
}
pub(crate) use wgsl_kernel_source;

/// A WGSL kernel template: its file name and the template values it needs.
pub struct KernelTemplate {
    /// File name under `shaders/wgsl/`.
    pub file: &'static str,
    /// The template text as compiled into the binary.
    pub source: &'static str,
    /// The template instantiated with example values, for validation.
    pub example: fn() -> String,
}

impl KernelTemplate {
    /// The template with `values` filled in.
    pub fn instantiate(&self, values: &[(&str, &str)]) -> String {
        let mut text = self.source.to_string();
        for (key, value) in values {
            text = text.replace(&format!("{{{{ {key} }}}}"), value);
        }
        text
    }
}

/// Every hand-written kernel in the crate.
pub const KERNELS: &[KernelTemplate] = &[
    sde_step::TEMPLATE,
    norm_modulate::TEMPLATE,
    joint_attention::TEMPLATE,
];
