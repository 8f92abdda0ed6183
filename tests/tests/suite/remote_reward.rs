//! The remote reward protocol: the reference server scores exactly like the local rewards, and a
//! server that is down, slow, answers garbage or the wrong number of scores gets retries with
//! backoff and then a clear error.

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use portaflow::reward::remote::{RemoteConfig, RemoteReward};
use portaflow::reward::{ByTaskReward, Reward, Task, server};
use portaflow::world::render::Image;
use portaflow::world::{compose, digits, prompt, render};
use rand::SeedableRng;

fn client(url: &str, retries: usize, timeout: f64) -> RemoteReward {
    RemoteReward::new(RemoteConfig {
        url: url.into(),
        name: "geneval+ocr".into(),
        timeout_seconds: timeout,
        retries,
        backoff_seconds: 0.05,
    })
    .unwrap()
}

/// Rendered scenes of the committed test prompts (exact answers) and a few digits images.
fn batch() -> (Vec<Image>, Vec<Task>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/prompts/shapes_test.jsonl");
    let specs = prompt::read_jsonl(&path).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut images = Vec::new();
    let mut tasks = Vec::new();
    for (i, spec) in specs.iter().take(12).enumerate() {
        // Every third image answers another prompt, so scores are not all 1.
        let shown = &specs[if i % 3 == 2 { i + 1 } else { i }];
        let scene = compose::scene_for(&mut rng, shown).unwrap();
        images.push(render::render(&scene, 64));
        tasks.push(Task::Shapes(spec.clone()));
    }
    for number in ["7", "42", "305"] {
        images.push(digits::render_number(&mut rng, number, 64));
        tasks.push(Task::Digits {
            prompt: digits::prompt_for(if number == "42" { "47" } else { number }),
        });
    }
    (images, tasks)
}

#[test]
fn the_reference_server_scores_like_the_local_reward() {
    let addr = server::spawn("127.0.0.1:0", Arc::new(ByTaskReward)).unwrap();
    let (images, tasks) = batch();
    let remote = client(&format!("http://{addr}/score"), 0, 30.0);
    let got = remote.score_with_boxes(&images, &tasks).unwrap();
    let want = ByTaskReward.score_with_boxes(&images, &tasks).unwrap();
    assert_eq!(got, want);
    assert!(
        got.boxes.iter().any(|b| !b.is_empty()),
        "mismatched scenes have boxes"
    );
    let got = got.scores;
    let rewards: Vec<f32> = got.iter().map(|s| s.unwrap().reward).collect();
    assert!(
        rewards.contains(&1.0) && rewards.iter().any(|&r| r < 1.0),
        "{rewards:?}"
    );
}

/// A server that answers request k with `answers[min(k, last)]` (status, body), counting them.
fn scripted_server(answers: Vec<(u16, &'static str)>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            let k = seen.fetch_add(1, Ordering::SeqCst);
            let _ = portaflow::reward::http::read_request(&stream);
            let (status, body) = answers[k.min(answers.len() - 1)];
            let _ = portaflow::reward::http::write_response(
                &stream,
                status,
                "text/plain",
                body.as_bytes(),
            );
        }
    });
    (url, count)
}

fn one_image() -> (Vec<Image>, Vec<Task>) {
    let (images, tasks) = batch();
    (images[..1].to_vec(), tasks[..1].to_vec())
}

#[test]
fn a_server_that_is_down_fails_after_its_retries() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }; // closed again: nothing listens there
    let (images, tasks) = one_image();
    let start = Instant::now();
    let err = client(&format!("http://127.0.0.1:{port}/"), 2, 5.0)
        .score(&images, &tasks)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot connect"), "{err}");
    assert!(err.contains("3 attempt(s)"), "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
    // Backoff 0.05 s then 0.1 s.
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_slow_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf); // read the request, never answer
            held.push(stream);
        }
    });
    let (images, tasks) = one_image();
    let start = Instant::now();
    let err = client(&url, 1, 0.3)
        .score(&images, &tasks)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("timed out") && err.contains("2 attempt(s)"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn garbage_and_wrong_counts_are_clear_errors() {
    let (images, tasks) = one_image();
    let (url, count) = scripted_server(vec![(200, "<html>gateway page</html>")]);
    let err = client(&url, 1, 5.0)
        .score(&images, &tasks)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a score response") && err.contains("gateway page"),
        "{err}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 2, "garbage is retried once");

    let (url, _) = scripted_server(vec![(200, r#"{"scores": [0.5, 0.5]}"#)]);
    let err = client(&url, 0, 5.0)
        .score(&images, &tasks)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sent 1 images, got 2 scores"), "{err}");

    let (url, count) = scripted_server(vec![(400, "unknown task")]);
    let err = client(&url, 3, 5.0)
        .score(&images, &tasks)
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP 400: unknown task"), "{err}");
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "a 4xx answer is not retried"
    );
}

#[test]
fn a_transient_failure_is_retried_and_nan_reaches_the_trainer() {
    let (images, tasks) = one_image();
    let (url, count) = scripted_server(vec![(503, "warming up"), (200, r#"{"scores": [NaN]}"#)]);
    let scores = client(&url, 2, 5.0).score(&images, &tasks).unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert!(scores[0].unwrap().reward.is_nan());
}

#[test]
fn the_server_names_what_is_wrong_with_a_request() {
    let addr = server::spawn("127.0.0.1:0", Arc::new(ByTaskReward)).unwrap();
    let post = |body: &str| {
        portaflow::reward::http::post_json(
            &format!("http://{addr}/"),
            body.as_bytes(),
            Duration::from_secs(10),
        )
        .unwrap()
    };
    let (status, body) = post("{}");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, body) = post(
        r#"{"protocol": "portaflow-reward/1", "prompts": ["x"], "metadata": [{"task": "digits", "prompt": "the number \"1\""}], "images": ["bm90IGEgcG5n"]}"#,
    );
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 400);
    assert!(text.contains("image 0"), "{text}");
    let (status, body) = post(r#"{"protocol": "v0", "prompts": [], "metadata": [], "images": []}"#);
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("portaflow-reward/1"));
}
