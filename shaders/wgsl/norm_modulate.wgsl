// Fused AdaLN input of an MMDiT / FLUX block: LayerNorm without affine parameters over the last
// dimension, then the per-sample modulation, one workgroup per row (token).
//
// Per row r of sample b = r / tokens:  μ = mean(x_r),  var = mean((x_r − μ)²),
//   out_r = (x_r − μ) / sqrt(var + eps) · (1 + scale_b) + shift_b.
// The plain-tensor twin is `modulate(layer_norm(x), shift, scale)` in `portaflow::model::layers`.
//
// Template values: {{ workgroup_size }} (power of two).
// Every binding is read_write: cubecl may pack several tensors into one buffer.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> shift: array<f32>;
@group(0) @binding(2) var<storage, read_write> scale: array<f32>;
// [bitcast<f32>(width), bitcast<f32>(tokens per sample), eps, bitcast<f32>(rows)]
@group(0) @binding(3) var<storage, read_write> params: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WORKGROUP_SIZE: u32 = {{ workgroup_size }}u;

var<workgroup> partial: array<f32, WORKGROUP_SIZE>;

// The sum of every lane's `value`, returned to every lane.
fn workgroup_sum(lane: u32, value: f32) -> f32 {
    partial[lane] = value;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // Rows beyond 65535 workgroups wrap into y; the surplus workgroups of the last y-row read
    // the last row and write nothing (no early return: the barriers need every lane).
    let width = bitcast<u32>(params[0]);
    let tokens = bitcast<u32>(params[1]);
    let eps = params[2];
    let rows = bitcast<u32>(params[3]);
    let id = workgroup.x + workgroup.y * groups.x;
    let row = min(id, rows - 1u);
    let base = row * width;
    let modulation = (row / tokens) * width;

    var sum = 0.0;
    for (var i = lane; i < width; i += WORKGROUP_SIZE) {
        sum += x[base + i];
    }
    let mean = workgroup_sum(lane, sum) / f32(width);

    var sum_sq = 0.0;
    for (var i = lane; i < width; i += WORKGROUP_SIZE) {
        let d = x[base + i] - mean;
        sum_sq += d * d;
    }
    let inv_std = 1.0 / sqrt(workgroup_sum(lane, sum_sq) / f32(width) + eps);

    if (id < rows) {
        for (var i = lane; i < width; i += WORKGROUP_SIZE) {
            let m = modulation + i;
            out[base + i] = (x[base + i] - mean) * inv_std * (1.0 + scale[m]) + shift[m];
        }
    }
}
