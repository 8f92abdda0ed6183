// Fused Flow-GRPO SDE step (ALGORITHMS.md §1.2–1.3), one workgroup per sample.
//
// Per element: mean = x·(1 + g²·dt/(2σ)) + v·(1 + g²·(1−σ)/(2σ))·dt,  x' = mean + g·sqrt(|dt|)·noise.
// Per sample:  log_prob = mean over elements of −(x'−mean)²/(2s²) − log s − log sqrt(2π),
//              s = g·sqrt(|dt|),  g = a·sqrt(σ / (1 − σ*)),  σ* = σ_max when σ == 1 else σ.
//
// Template values: {{ workgroup_size }} (power of two).
// Every binding is read_write: cubecl may pack several tensors into one buffer.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> v: array<f32>;
@group(0) @binding(2) var<storage, read_write> noise: array<f32>;
// [σ, σ', σ_max, a, bitcast<f32>(elements per sample)]
@group(0) @binding(3) var<storage, read_write> params: array<f32>;
@group(0) @binding(4) var<storage, read_write> x_next: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> log_prob: array<f32>;

const WORKGROUP_SIZE: u32 = {{ workgroup_size }}u;
const LOG_SQRT_2PI: f32 = 0.91893853320467274;

var<workgroup> partial: array<f32, WORKGROUP_SIZE>;

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let sample = workgroup.x;
    let sigma = params[0];
    let sigma_next = params[1];
    let sigma_max = params[2];
    let noise_level = params[3];
    let per_sample = bitcast<u32>(params[4]);

    let sigma_star = select(sigma, sigma_max, sigma == 1.0);
    let g = noise_level * sqrt(sigma / (1.0 - sigma_star));
    let dt = sigma_next - sigma;
    let coef_x = 1.0 + g * g * dt / (2.0 * sigma);
    let coef_v = (1.0 + g * g * (1.0 - sigma) / (2.0 * sigma)) * dt;
    let step_std = g * sqrt(-dt);

    var sum_sq = 0.0;
    let base = sample * per_sample;
    for (var i = lane; i < per_sample; i += WORKGROUP_SIZE) {
        let idx = base + i;
        let m = coef_x * x[idx] + coef_v * v[idx];
        let next = m + step_std * noise[idx];
        mean[idx] = m;
        x_next[idx] = next;
        let diff = next - m;
        sum_sq += diff * diff;
    }
    partial[lane] = sum_sq;
    workgroupBarrier();

    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }

    if (lane == 0u) {
        log_prob[sample] = -partial[0] / (2.0 * step_std * step_std * f32(per_sample)) - log(step_std) - LOG_SQRT_2PI;
    }
}
