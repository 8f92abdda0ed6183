//! Hand-written WGSL kernels equal their plain burn-tensor twins on the Vulkan adapter.

use burn::tensor::{Distribution, Tensor};
use portaflow::device::ChosenDevice;
use portaflow::sample::schedule::Schedule;
use portaflow::sample::step;
use portaflow_tests::{max_abs_diff, vulkan};

fn vec(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec().unwrap()
}

#[test]
fn fused_sde_step_equals_tensor_implementation_on_every_step() {
    let gpu = vulkan();
    let cpu = ChosenDevice::cpu();
    let shape = [3, 4, 8, 8];
    let schedule = Schedule::shifted(10, 3.0).unwrap();
    // Every trained step, σ = 1 (substitution) included; the last (σ' = 0) step too.
    for i in 0..schedule.steps() {
        let (sigma, next, sigma_max) = (
            schedule.sigmas[i],
            schedule.sigmas[i + 1],
            schedule.sigma_max(),
        );
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &cpu.device);
        let v = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &cpu.device);
        let noise = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &cpu.device);
        let on_gpu = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &gpu.device);

        let want = step::flow_sde_step(
            on_gpu(&x),
            on_gpu(&v),
            on_gpu(&noise),
            sigma,
            next,
            sigma_max,
            0.7,
        );
        let got = portaflow_shaders::flow_sde_step(
            on_gpu(&x),
            on_gpu(&v),
            on_gpu(&noise),
            sigma,
            next,
            sigma_max,
            0.7,
        )
        .unwrap();
        let scale = |v: &[f32]| v.iter().fold(1.0f32, |m, x| m.max(x.abs()));

        let (want_next, got_next) = (vec(want.next), vec(got.next));
        let (want_mean, got_mean) = (vec(want.mean), vec(got.mean));
        let want_lp: Vec<f32> = want.log_prob.into_data().try_to_vec().unwrap();
        let got_lp: Vec<f32> = got.log_prob.into_data().try_to_vec().unwrap();
        assert_eq!(got_lp.len(), 3);
        let next_err = max_abs_diff(&want_next, &got_next) / scale(&want_next);
        let mean_err = max_abs_diff(&want_mean, &got_mean) / scale(&want_mean);
        let lp_err = max_abs_diff(&want_lp, &got_lp) / scale(&want_lp);
        assert!(
            next_err <= 1e-5 && mean_err <= 1e-5 && lp_err <= 1e-5,
            "step {i} (σ {sigma:.4} → {next:.4}): relative errors next {next_err:e}, mean {mean_err:e}, log-prob {lp_err:e}"
        );
        // The kernel agrees with the CPU too, not only with itself on the same device.
        let cpu_lp: Vec<f32> = step::flow_sde_step(x, v, noise, sigma, next, sigma_max, 0.7)
            .log_prob
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(
            max_abs_diff(&cpu_lp, &got_lp) / scale(&cpu_lp) <= 1e-5,
            "step {i}: {cpu_lp:?} vs {got_lp:?}"
        );
    }
}

#[test]
fn fused_sde_step_log_prob_is_the_gaussian_density_of_the_noise() {
    // With x' = μ + s·z the log-prob is mean(−z²/2) − log s − log √(2π): an independent check
    // of the kernel's reduction on a sample larger than one workgroup pass.
    let gpu = vulkan();
    let shape = [2, 16, 32, 32];
    let noise = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &gpu.device);
    let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &gpu.device);
    let v = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &gpu.device);
    let z: Vec<f32> = noise.to_data().try_to_vec().unwrap();
    let got = portaflow_shaders::flow_sde_step(x, v, noise, 0.7, 0.6, 0.96, 0.7).unwrap();
    let std = portaflow::sample::schedule::flow_sde_std(0.7, 0.6, 0.96, 0.7);
    let got: Vec<f32> = got.log_prob.into_data().try_to_vec().unwrap();
    let per = z.len() / 2;
    for b in 0..2 {
        let mean_sq: f64 = z[b * per..(b + 1) * per]
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            / per as f64;
        let want = -mean_sq / 2.0 - std.ln() - (2.0 * std::f64::consts::PI).sqrt().ln();
        assert!(
            (got[b] as f64 - want).abs() < 1e-4,
            "sample {b}: {} vs {want}",
            got[b]
        );
    }
}

#[test]
fn fused_sde_step_refuses_bad_input_with_a_message() {
    let gpu = vulkan();
    let cpu = ChosenDevice::cpu();
    let t = |d: &burn::tensor::Device| Tensor::<4>::zeros([1, 2, 2, 2], d);
    let err = portaflow_shaders::flow_sde_step(
        t(&cpu.device),
        t(&cpu.device),
        t(&cpu.device),
        0.5,
        0.4,
        0.9,
        0.7,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("wgpu"), "{err}");
    let wrong = Tensor::<4>::zeros([1, 2, 2, 3], &gpu.device);
    let err =
        portaflow_shaders::flow_sde_step(t(&gpu.device), wrong, t(&gpu.device), 0.5, 0.4, 0.9, 0.7)
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("`v`") && err.contains("[1, 2, 2, 3]"), "{err}");
    let err = portaflow_shaders::flow_sde_step(
        t(&gpu.device),
        t(&gpu.device),
        t(&gpu.device),
        0.4,
        0.5,
        0.9,
        0.7,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("sigma_next < sigma"), "{err}");
}

#[test]
fn fused_norm_modulate_equals_layer_norm_then_modulate() {
    use portaflow::model::layers::{layer_norm, modulate, norm_modulate};
    let gpu = vulkan();
    let cpu = ChosenDevice::cpu();
    // Widths below, at and above the 64-lane workgroup, not multiples of it; an offset mean
    // and a large scale, where a one-pass variance would lose precision.
    for (b, tokens, width) in [(1, 1, 7), (2, 5, 64), (3, 9, 100), (2, 16, 200)] {
        let x = Tensor::<3>::random(
            [b, tokens, width],
            Distribution::Normal(3.0, 5.0),
            &cpu.device,
        );
        let shift = Tensor::<2>::random([b, width], Distribution::Normal(0.0, 1.0), &cpu.device);
        let scale = Tensor::<2>::random([b, width], Distribution::Normal(0.0, 1.0), &cpu.device);
        let want: Vec<f32> = modulate(layer_norm(x.clone()), shift.clone(), scale.clone())
            .into_data()
            .try_to_vec()
            .unwrap();
        let g3 = |t: &Tensor<3>| Tensor::<3>::from_data(t.to_data(), &gpu.device);
        let g2 = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &gpu.device);
        let got: Vec<f32> = portaflow_shaders::norm_modulate(g3(&x), g2(&shift), g2(&scale), 1e-6)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        let err = max_abs_diff(&want, &got);
        assert!(err < 1e-4, "[{b}, {tokens}, {width}]: max difference {err}");
        // The layer the models call takes the kernel on wgpu and agrees too.
        let layer: Vec<f32> = norm_modulate(g3(&x), g2(&shift), g2(&scale))
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(
            max_abs_diff(&want, &layer) < 1e-4,
            "[{b}, {tokens}, {width}] via the layer"
        );
    }
    // Bad input is named.
    let x = Tensor::<3>::zeros([2, 3, 8], &gpu.device);
    let err = portaflow_shaders::norm_modulate(
        x.clone(),
        Tensor::<2>::zeros([2, 8], &gpu.device),
        Tensor::<2>::zeros([2, 9], &gpu.device),
        1e-6,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("`scale`") && err.contains("[2, 9]"), "{err}");
    let on_cpu = Tensor::<3>::zeros([2, 3, 8], &cpu.device);
    let err = portaflow_shaders::norm_modulate(
        on_cpu,
        Tensor::<2>::zeros([2, 8], &cpu.device),
        Tensor::<2>::zeros([2, 8], &cpu.device),
        1e-6,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("wgpu"), "{err}");
}

/// The plain-tensor attention the fused kernel replaces: heads split, RMS-normed q and k (each
/// segment with its own weights), RoPE, attention, heads merged.
#[allow(clippy::too_many_arguments)]
fn plain_joint_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    first: usize,
    norms: Option<(&Tensor<2>, f64)>,
    rope: Option<(&Tensor<2>, &Tensor<2>)>,
) -> Tensor<3> {
    use portaflow::model::layers::{apply_rope, merge_heads, sdpa, split_heads};
    let [_, n, _] = q.dims();
    // [b, heads, n, head_dim]
    let (mut q, mut k, v) = (
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
    );
    if let Some((w, eps)) = norms {
        let norm = |x: Tensor<4>, a: usize, b: usize| {
            let rms = |x: Tensor<4>, row: usize| {
                let weight: Tensor<4> = w.clone().narrow(0, row, 1).unsqueeze(); // [1, 1, 1, hd]
                let scale = x.clone().square().mean_dim(3).add_scalar(eps).sqrt();
                x / scale * weight
            };
            let head = rms(x.clone().narrow(2, 0, first), a);
            if first == n {
                return head;
            }
            Tensor::cat(vec![head, rms(x.narrow(2, first, n - first), b)], 2)
        };
        q = norm(q, 0, 2);
        k = norm(k, 1, 3);
    }
    if let Some((cos, sin)) = rope {
        let (cos, sin): (Tensor<4>, Tensor<4>) = (cos.clone().unsqueeze(), sin.clone().unsqueeze());
        q = apply_rope(q, &cos, &sin);
        k = apply_rope(k, &cos, &sin);
    }
    merge_heads(sdpa(q, k, v))
}

#[test]
fn fused_joint_attention_equals_split_norm_rope_attention_merge() {
    use portaflow_shaders::{AttentionOptions, joint_attention};
    let gpu = vulkan();
    let cpu = ChosenDevice::cpu();
    let normal = Distribution::Normal(0.0, 1.0);
    // (b, n, first, heads, head_dim, norm, rope): the bundled SD3 model's 64 image + 16 text
    // tokens; a short odd sequence; a sequence longer than a tile and a workgroup with FLUX-like
    // RoPE and no norm; one token.
    for (b, n, first, heads, head_dim, norm, rope) in [
        (2, 80, 64, 4, 32, true, false),
        (1, 7, 3, 2, 16, true, true),
        (2, 150, 100, 2, 64, false, true),
        (1, 1, 1, 1, 4, false, false),
    ] {
        let width = heads * head_dim;
        let input =
            || Tensor::<3>::random([b, n, width], Distribution::Normal(0.5, 2.0), &cpu.device);
        let (q, k, v) = (input(), input(), input());
        let weights = Tensor::<2>::random([4, head_dim], normal, &cpu.device);
        let angles = Tensor::<2>::random(
            [n, head_dim / 2],
            Distribution::Uniform(-3.0, 3.0),
            &cpu.device,
        )
        .unsqueeze_dim::<3>(2)
        .repeat_dim(2, 2)
        .reshape([n, head_dim]); // each angle twice: interleaved pairs
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let want: Vec<f32> = plain_joint_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            heads,
            first,
            norm.then_some((&weights, 1e-6)),
            rope.then_some((&cos, &sin)),
        )
        .into_data()
        .try_to_vec()
        .unwrap();
        let g3 = |t: &Tensor<3>| Tensor::<3>::from_data(t.to_data(), &gpu.device);
        let g2 = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &gpu.device);
        let got: Vec<f32> = joint_attention(
            g3(&q),
            g3(&k),
            g3(&v),
            norm.then(|| g2(&weights)),
            rope.then(|| (g2(&cos), g2(&sin))),
            AttentionOptions {
                heads,
                first,
                norm_eps: norm.then_some(1e-6),
                rope,
            },
        )
        .unwrap()
        .into_data()
        .try_to_vec()
        .unwrap();
        let err = max_abs_diff(&want, &got);
        assert!(
            err < 1e-4,
            "b {b}, n {n}, first {first}, heads {heads}, head_dim {head_dim}: max difference {err}"
        );
    }
    // Bad input is named.
    let options = AttentionOptions {
        heads: 2,
        first: 3,
        norm_eps: Some(1e-6),
        rope: false,
    };
    let x = || Tensor::<3>::zeros([1, 5, 8], &gpu.device);
    let err = joint_attention(
        x(),
        x(),
        x(),
        Some(Tensor::<2>::zeros([4, 3], &gpu.device)),
        None,
        options,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("`norms`") && err.contains("[4, 3]"), "{err}");
    let err = joint_attention(x(), x(), x(), None, None, options)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("norm"), "{err}");
    let on_cpu = || Tensor::<3>::zeros([1, 5, 8], &cpu.device);
    let err = joint_attention(
        on_cpu(),
        on_cpu(),
        on_cpu(),
        None,
        None,
        AttentionOptions {
            norm_eps: None,
            ..options
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("wgpu"), "{err}");
}

/// Times the fused attention against the tensor ops it replaces on the Vulkan adapter, at the
/// bundled model's size (`cargo test --workspace --test suite kernels::joint_attention_timing --
/// --ignored --nocapture`).
#[test]
#[ignore = "a measurement, not a check"]
fn joint_attention_timing() {
    use portaflow_shaders::{AttentionOptions, joint_attention};
    let gpu = vulkan();
    // The bundled model's size (64 image + 16 text tokens, 4 heads of 32), then 4× the tokens.
    for (b, n, first, heads, head_dim) in [
        (2, 80, 64, 4, 32),
        (2, 160, 128, 4, 32),
        (2, 320, 256, 4, 32),
    ] {
        let width = heads * head_dim;
        let input =
            || Tensor::<3>::random([b, n, width], Distribution::Normal(0.0, 1.0), &gpu.device);
        let (q, k, v) = (input(), input(), input());
        let weights =
            Tensor::<2>::random([4, head_dim], Distribution::Normal(1.0, 0.1), &gpu.device);
        let options = AttentionOptions {
            heads,
            first,
            norm_eps: Some(1e-6),
            rope: false,
        };
        let time = |name: &str, f: &dyn Fn() -> Tensor<3>| {
            for _ in 0..3 {
                let _ = f().into_data();
            }
            let start = std::time::Instant::now();
            let runs = 20;
            for _ in 0..runs {
                let _ = f().into_data();
            }
            println!(
                "b {b}, n {n}: {name}: {:.2} ms per call",
                start.elapsed().as_secs_f64() * 1e3 / runs as f64
            );
        };
        time("fused", &|| {
            joint_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(weights.clone()),
                None,
                options,
            )
            .unwrap()
        });
        time("tensor ops", &|| {
            plain_joint_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                heads,
                first,
                Some((&weights, 1e-6)),
                None,
            )
        });
        time("a copy of q (one launch and the read-back)", &|| {
            q.clone() * 1.0
        });
    }
}

/// Achieved throughput on the Vulkan adapter: burn's matmul at a few sizes (the adapter's
/// practical f32 peak) and our kernels at the bundled model's sizes. Each figure is the time of a
/// chain of 31 dependent calls minus a chain of 11, over 20, so the read-back and fixed costs drop
/// out. (Element-wise ops are not measured this way: burn's fusion merges a chain of them into
/// one kernel.) `cargo test --workspace --test suite
/// kernels::adapter_roofline -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn adapter_roofline() {
    use portaflow_shaders::{AttentionOptions, joint_attention, norm_modulate};
    let gpu = vulkan();
    println!("adapter: {gpu}");
    let random = |shape: Vec<usize>, mean: f64| {
        Tensor::<3>::random(shape, Distribution::Normal(mean, 1.0), &gpu.device)
    };
    // Seconds per call of `step`, applied `n` times in a chain.
    let per_call = |start: Tensor<3>, step: &dyn Fn(Tensor<3>) -> Tensor<3>| {
        let chain = |n: usize| {
            let _ = step(start.clone()).into_data();
            let t = std::time::Instant::now();
            let mut x = start.clone();
            for _ in 0..n {
                x = step(x);
            }
            let _ = x.into_data();
            t.elapsed().as_secs_f64()
        };
        let (short, long) = (chain(11).min(chain(11)), chain(31).min(chain(31)));
        ((long - short) / 20.0).max(1e-9)
    };
    for n in [128, 256, 512, 1024] {
        let b = random(vec![1, n, n], 0.0) / (n as f64).sqrt();
        let s = per_call(random(vec![1, n, n], 0.0), &|x| x.matmul(b.clone()));
        println!(
            "matmul {n}³: {:.2} ms, {:.2} GFLOP/s",
            s * 1e3,
            2.0 * (n * n * n) as f64 / s / 1e9
        );
    }
    // The bundled model: CFG batch 2, 64 image + 16 text tokens, width 128, 4 heads of 32.
    let (b, tokens, width) = (2, 64, 128);
    let shift = Tensor::<2>::random([b, width], Distribution::Normal(0.0, 1.0), &gpu.device);
    let scale = shift.clone() * 0.1;
    let s = per_call(random(vec![b, tokens, width], 0.0), &|x| {
        norm_modulate(x, shift.clone(), scale.clone(), 1e-6).unwrap()
    });
    println!(
        "norm_modulate [{b}, {tokens}, {width}]: {:.3} ms, {:.3} GB/s",
        s * 1e3,
        8.0 * (b * tokens * width) as f64 / s / 1e9
    );
    let norms = Tensor::<2>::random([4, 32], Distribution::Normal(1.0, 0.1), &gpu.device);
    for n in [80, 320] {
        let (k, v) = (
            random(vec![b, n, width], 0.0),
            random(vec![b, n, width], 0.0),
        );
        let options = AttentionOptions {
            heads: 4,
            first: n * 4 / 5,
            norm_eps: Some(1e-6),
            rope: false,
        };
        let s = per_call(random(vec![b, n, width], 0.0), &|q| {
            joint_attention(q, k.clone(), v.clone(), Some(norms.clone()), None, options).unwrap()
        });
        println!(
            "joint_attention b {b}, n {n}: {:.2} ms, {:.2} GFLOP/s",
            s * 1e3,
            4.0 * (b * n * n * width) as f64 / s / 1e9
        );
    }
}
