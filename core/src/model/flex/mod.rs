//! Hand-written kernels for burn's Flex CPU backend, each where Flex's generic op left most of a
//! profile on the table, each tested against the tensor-op version and used only where it
//! applies (f32 on Flex; the others fall back to burn's ops).

pub mod activations;
pub mod attention;
pub mod conv;
