//! Hand-written kernels for burn's Flex CPU backend, each replacing a generic Flex op that a
//! profile showed to be costly, each tested against burn's version and used only where its
//! `applies` holds (f32 on Flex; everything else keeps burn's ops).

pub mod activations;
pub mod attention;
pub mod conv;
pub mod mlp;

/// A matrix operand read in place: element (i, j) is `data[i·strides[0] + j·strides[1]]`, so a
/// transposed operand is its row-major storage with the strides swapped.
struct Strided<'a>(&'a [f32], [usize; 2]);

/// `dst` `[m, n]` row-major = `scale` · lhs `[m, k]` · rhs `[k, n]`, added to what `dst` holds
/// when `accumulate`; single-threaded (callers parallelise over heads or images).
fn matmul(
    dst: &mut [f32],
    [m, n, k]: [usize; 3],
    lhs: Strided,
    rhs: Strided,
    scale: f32,
    accumulate: bool,
) {
    matmul_into(dst, [n, 1], [m, n, k], lhs, rhs, scale, accumulate);
}

/// [`matmul`] into a strided `dst`: element (i, j) at `dst[i·dst_rs + j·dst_cs]`.
fn matmul_into(
    dst: &mut [f32],
    [dst_rs, dst_cs]: [usize; 2],
    [m, n, k]: [usize; 3],
    Strided(lhs, [lhs_rs, lhs_cs]): Strided,
    Strided(rhs, [rhs_rs, rhs_cs]): Strided,
    scale: f32,
    accumulate: bool,
) {
    if m * n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + (n - 1) * dst_cs < dst.len(),
        "matmul: dst"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return;
    }
    assert!(
        (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
        "matmul: lhs"
    );
    assert!(
        (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
        "matmul: rhs"
    );
    // SAFETY: the asserts above bound every index the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
