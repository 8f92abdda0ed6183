// Multi-head attention over one joint sequence with the qk-norm and RoPE of SD3.5 / FLUX fused
// in: reads q, k, v straight from the projections ([b, n, heads·head_dim], no head split),
// normalises and rotates each query and key once, runs an online softmax over key tiles held in
// workgroup memory, and writes the merged heads ([b, n, heads·head_dim]).
//
// For query row i of head h (every vector below is that head's slice, length D = head_dim):
//   q̂ = rope_i(rms(q_i) · wq(i)),  k̂_j = rope_j(rms(k_j) · wk(j)),
//   out_i = Σ_j softmax_j(q̂ · k̂_j / √D) · v_j,
// rms(x) = x / sqrt(mean(x²) + eps); wq / wk are the first segment's norm weights for rows
// below `first` (the image tokens in SD3's order) and the second's after; rope_i(x) rotates the
// pairs (x[2p], x[2p+1]) by the angle in row i of the tables: x·cos + rot(x)·sin,
// rot(x)[2p] = −x[2p+1], rot(x)[2p+1] = x[2p]. Each of the norm and RoPE is off unless its flag
// is set. The plain-tensor twin is `split_heads` → `RmsNorm` → `apply_rope` → `sdpa` →
// `merge_heads` in `portaflow::model::layers`.
//
// One workgroup per (sample, head, block of WORKGROUP_SIZE query rows); one lane per query row.
// Template values: {{ workgroup_size }}, {{ head_dim }} (even), {{ tile }} (keys per tile;
// 2·tile·head_dim floats of workgroup memory).
// Every binding is read_write: cubecl may pack several tensors into one buffer.

@group(0) @binding(0) var<storage, read_write> q: array<f32>;
@group(0) @binding(1) var<storage, read_write> k: array<f32>;
@group(0) @binding(2) var<storage, read_write> v: array<f32>;
// [4, head_dim]: q and k weights of the first segment, then of the second.
@group(0) @binding(3) var<storage, read_write> norms: array<f32>;
// [2, n, head_dim]: cos rows, then sin rows.
@group(0) @binding(4) var<storage, read_write> rope: array<f32>;
// [bitcast(n), bitcast(first), bitcast(heads), bitcast(flags: 1 norm, 2 rope), eps,
//  bitcast(query blocks per head), bitcast(b)]
@group(0) @binding(5) var<storage, read_write> params: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

const WORKGROUP_SIZE: u32 = {{ workgroup_size }}u;
const D: u32 = {{ head_dim }}u;
const TILE: u32 = {{ tile }}u;

var<workgroup> keys: array<f32, TILE * D>;
var<workgroup> values: array<f32, TILE * D>;
var<workgroup> shared_n: u32;
var<workgroup> shared_units: u32;

// The RMS norm's factor for a row whose squares sum to `sum_sq`.
fn rms_scale(sum_sq: f32, eps: f32) -> f32 {
    return 1.0 / sqrt(sum_sq / f32(D) + eps);
}

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    if (lane == 0u) {
        shared_n = bitcast<u32>(params[0]);
        shared_units = bitcast<u32>(params[2]) * bitcast<u32>(params[5])
            * bitcast<u32>(params[6]);
    }
    // Uniform copies: the tile loop below holds barriers.
    let n = workgroupUniformLoad(&shared_n);
    let units = workgroupUniformLoad(&shared_units);
    let first = bitcast<u32>(params[1]);
    let heads = bitcast<u32>(params[2]);
    let flags = bitcast<u32>(params[3]);
    let eps = params[4];
    let blocks = bitcast<u32>(params[5]);
    let use_norm = (flags & 1u) != 0u;
    let use_rope = (flags & 2u) != 0u;

    // Workgroups beyond 65535 wrap into y; surplus ones of the last y-row redo the last unit
    // and write nothing (no early return: the barriers need every lane).
    let id = workgroup.x + workgroup.y * groups.x;
    let unit = min(id, units - 1u);
    let block = unit % blocks;
    let head = (unit / blocks) % heads;
    let sample = unit / (blocks * heads);
    let width = heads * D;
    let row = block * WORKGROUP_SIZE + lane;
    let live = id < units && row < n;
    let query = min(row, n - 1u);
    let sample_base = sample * n * width + head * D;

    // This lane's query, normalised, rotated and scaled by 1/√D.
    var qr: array<f32, D>;
    var sum_sq = 0.0;
    for (var d = 0u; d < D; d++) {
        qr[d] = q[sample_base + query * width + d];
        sum_sq += qr[d] * qr[d];
    }
    if (use_norm) {
        let s = rms_scale(sum_sq, eps);
        let w = select(2u, 0u, query < first) * D;
        for (var d = 0u; d < D; d++) {
            qr[d] = qr[d] * s * norms[w + d];
        }
    }
    if (use_rope) {
        for (var d = 0u; d < D; d += 2u) {
            let c0 = rope[query * D + d];
            let c1 = rope[query * D + d + 1u];
            let s0 = rope[(n + query) * D + d];
            let s1 = rope[(n + query) * D + d + 1u];
            let even = qr[d];
            let odd = qr[d + 1u];
            qr[d] = even * c0 - odd * s0;
            qr[d + 1u] = odd * c1 + even * s1;
        }
    }
    let scale = 1.0 / sqrt(f32(D));
    for (var d = 0u; d < D; d++) {
        qr[d] *= scale;
    }

    var best = -3.0e38;
    var total = 0.0;
    var acc: array<f32, D>;
    for (var d = 0u; d < D; d++) {
        acc[d] = 0.0;
    }

    for (var start = 0u; start < n; start += TILE) {
        // The tile's keys and values, zero past the end.
        for (var i = lane; i < TILE * D; i += WORKGROUP_SIZE) {
            let key = start + i / D;
            let at = sample_base + min(key, n - 1u) * width + i % D;
            let inside = key < n;
            keys[i] = select(0.0, k[at], inside);
            values[i] = select(0.0, v[at], inside);
        }
        workgroupBarrier();
        // Each key normalised and rotated once, by one lane.
        for (var j = lane; j < TILE; j += WORKGROUP_SIZE) {
            let key = min(start + j, n - 1u);
            let base = j * D;
            if (use_norm) {
                var ss = 0.0;
                for (var d = 0u; d < D; d++) {
                    ss += keys[base + d] * keys[base + d];
                }
                let s = rms_scale(ss, eps);
                let w = select(3u, 1u, key < first) * D;
                for (var d = 0u; d < D; d++) {
                    keys[base + d] = keys[base + d] * s * norms[w + d];
                }
            }
            if (use_rope) {
                for (var d = 0u; d < D; d += 2u) {
                    let c0 = rope[key * D + d];
                    let c1 = rope[key * D + d + 1u];
                    let s0 = rope[(n + key) * D + d];
                    let s1 = rope[(n + key) * D + d + 1u];
                    let even = keys[base + d];
                    let odd = keys[base + d + 1u];
                    keys[base + d] = even * c0 - odd * s0;
                    keys[base + d + 1u] = odd * c1 + even * s1;
                }
            }
        }
        workgroupBarrier();
        let count = min(TILE, n - start);
        for (var j = 0u; j < count; j++) {
            var score = 0.0;
            for (var d = 0u; d < D; d++) {
                score += qr[d] * keys[j * D + d];
            }
            let next = max(best, score);
            let fade = exp(best - next);
            let p = exp(score - next);
            total = total * fade + p;
            for (var d = 0u; d < D; d++) {
                acc[d] = acc[d] * fade + p * values[j * D + d];
            }
            best = next;
        }
        workgroupBarrier();
    }

    if (live) {
        let inv = 1.0 / total;
        for (var d = 0u; d < D; d++) {
            out[sample_base + row * width + d] = acc[d] * inv;
        }
    }
}
