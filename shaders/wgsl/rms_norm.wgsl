// RMSNorm with a learned scale over the last dimension (the q / k norms of SD3.5 and FLUX, the
// text encoders' norms), one workgroup per row:
//   out_r = x_r / sqrt(mean(x_r²) + eps) · weight.
// The plain-tensor twin is `RmsNorm::forward` in `portaflow::model::layers`.
//
// Template values: {{ workgroup_size }} (power of two).
// Every binding is read_write: cubecl may pack several tensors into one buffer.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> weight: array<f32>;
// [bitcast<f32>(width), eps, bitcast<f32>(rows)]
@group(0) @binding(2) var<storage, read_write> params: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WORKGROUP_SIZE: u32 = {{ workgroup_size }}u;

var<workgroup> partial: array<f32, WORKGROUP_SIZE>;

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // Rows beyond 65535 workgroups wrap into y; the surplus workgroups of the last y-row read
    // the last row and write nothing (no early return: the barriers need every lane).
    let width = bitcast<u32>(params[0]);
    let eps = params[1];
    let rows = bitcast<u32>(params[2]);
    let id = workgroup.x + workgroup.y * groups.x;
    let base = min(id, rows - 1u) * width;

    var sum_sq = 0.0;
    for (var i = lane; i < width; i += WORKGROUP_SIZE) {
        let v = x[base + i];
        sum_sq += v * v;
    }
    partial[lane] = sum_sq;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    let inv_rms = 1.0 / sqrt(partial[0] / f32(width) + eps);

    if (id < rows) {
        for (var i = lane; i < width; i += WORKGROUP_SIZE) {
            out[base + i] = x[base + i] * inv_rms * weight[i];
        }
    }
}
