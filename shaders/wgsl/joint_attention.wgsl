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
// One workgroup per (sample, head, block of WORKGROUP_SIZE query rows), one lane per query row.
// A lane keeps its query and its output in D/4 vec4 registers each (`qr0`, `qr1`, …, `acc0`, `acc1`,
// …: the template writes one line per vec4, since private arrays are slow on CPU drivers), and
// runs an online softmax over key tiles that all lanes read at the same index, keeping its
// scores of the current tile in workgroup memory.
// Template values: workgroup_size, head_dim (a multiple of 4), tile (keys per tile), and the
// per-vec4 blocks load_query, query_squares, finish_query, zero_output, score, rescale,
// accumulate and store_output (`JointAttentionSource` in `src/joint_attention.rs` writes them).
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
// Head dim in vec4s.
const D4: u32 = D / 4u;
const TILE: u32 = {{ tile }}u;

var<workgroup> keys: array<vec4<f32>, TILE * D4>;
var<workgroup> values: array<vec4<f32>, TILE * D4>;
// Per key of the tile: its norm factor.
var<workgroup> key_scale: array<f32, TILE>;
// Each lane's scores of the tile: [TILE, WORKGROUP_SIZE].
var<workgroup> scores: array<f32, TILE * WORKGROUP_SIZE>;
var<workgroup> shared_n: u32;
var<workgroup> shared_units: u32;

// The RMS norm's factor for a row whose squares sum to `sum_sq`.
fn rms_scale(sum_sq: f32, eps: f32) -> f32 {
    return 1.0 / sqrt(sum_sq / f32(D) + eps);
}

// Four consecutive values of a buffer (WGSL cannot pass storage pointers to functions).
fn q4(at: u32) -> vec4<f32> {
    return vec4<f32>(q[at], q[at + 1u], q[at + 2u], q[at + 3u]);
}

fn k4(at: u32) -> vec4<f32> {
    return vec4<f32>(k[at], k[at + 1u], k[at + 2u], k[at + 3u]);
}

fn v4(at: u32) -> vec4<f32> {
    return vec4<f32>(v[at], v[at + 1u], v[at + 2u], v[at + 3u]);
}

fn norms4(at: u32) -> vec4<f32> {
    return vec4<f32>(norms[at], norms[at + 1u], norms[at + 2u], norms[at + 3u]);
}

fn rope4(at: u32) -> vec4<f32> {
    return vec4<f32>(rope[at], rope[at + 1u], rope[at + 2u], rope[at + 3u]);
}

fn store4(at: u32, x: vec4<f32>) {
    out[at] = x.x;
    out[at + 1u] = x.y;
    out[at + 2u] = x.z;
    out[at + 3u] = x.w;
}

// Chunk `c` of a row of `token` (two RoPE pairs) rotated by the angles of the token's table row.
fn rotate(x: vec4<f32>, token: u32, n: u32, c: u32) -> vec4<f32> {
    let cos = rope4(token * D + 4u * c);
    let sin = rope4((n + token) * D + 4u * c);
    return x * cos + vec4<f32>(-x.y, x.x, -x.w, x.z) * sin;
}

// Chunk `c` of a query or key scaled by `s`, then weighted by norm row `weights` (when `norm`)
// and rotated as `token` (when `rotary`).
fn finish(x: vec4<f32>, c: u32, s: f32, weights: u32, token: u32, n: u32, norm: bool, rotary: bool) -> vec4<f32> {
    var y = x * s;
    if (norm) {
        y *= norms4(weights * D + 4u * c);
    }
    if (rotary) {
        y = rotate(y, token, n, c);
    }
    return y;
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
    let sample_base = sample * n * width + head * D;
    let row = block * WORKGROUP_SIZE + lane;
    let live = id < units && row < n;
    let query = min(row, n - 1u);

    // This lane's query, normalised, rotated and scaled by 1/√D.
    let at = sample_base + query * width;
{{ load_query }}
    let qs = select(1.0, rms_scale({{ query_squares }}, eps), use_norm) / sqrt(f32(D));
    let qw = select(2u, 0u, query < first);
{{ finish_query }}

    var best = -3.0e38;
    var total = 0.0;
{{ zero_output }}

    for (var start = 0u; start < n; start += TILE) {
        // The tile's keys and values, zero past the end.
        for (var i = lane; i < TILE * D4; i += WORKGROUP_SIZE) {
            let key = start + i / D4;
            let src = sample_base + min(key, n - 1u) * width + 4u * (i % D4);
            let inside = key < n;
            keys[i] = select(vec4<f32>(0.0), k4(src), inside);
            values[i] = select(vec4<f32>(0.0), v4(src), inside);
        }
        workgroupBarrier();
        // Each key normalised and rotated once.
        for (var j = lane; j < TILE; j += WORKGROUP_SIZE) {
            var ss = 0.0;
            for (var i = 0u; i < D4; i++) {
                ss += dot(keys[j * D4 + i], keys[j * D4 + i]);
            }
            key_scale[j] = select(1.0, rms_scale(ss, eps), use_norm);
        }
        workgroupBarrier();
        if (use_norm || use_rope) {
            for (var i = lane; i < TILE * D4; i += WORKGROUP_SIZE) {
                let j = i / D4;
                let key = min(start + j, n - 1u);
                let kw = select(3u, 1u, key < first);
                keys[i] = finish(keys[i], i % D4, key_scale[j], kw, key, n, use_norm, use_rope);
            }
        }
        workgroupBarrier();
        // Two passes over the tile: the scores and their max, then one exp per key and one
        // rescale of the running sums per tile.
        let count = min(TILE, n - start);
        var next = best;
        for (var j = 0u; j < count; j++) {
            let kb = j * D4;
            let score = {{ score }};
            scores[j * WORKGROUP_SIZE + lane] = score;
            next = max(next, score);
        }
        let fade = exp(best - next);
        total *= fade;
{{ rescale }}
        for (var j = 0u; j < count; j++) {
            let kb = j * D4;
            let p = exp(scores[j * WORKGROUP_SIZE + lane] - next);
            total += p;
{{ accumulate }}
        }
        best = next;
        workgroupBarrier();
    }

    if (live) {
        let inv = 1.0 / total;
        let to = sample_base + row * width;
{{ store_output }}
    }
}
