//! Rewards computed by another process over HTTP with JSON — the answer to flow_grpo's
//! pickle-over-HTTP reward servers, readable from any language.
//!
//! # Protocol `portaflow-reward/1`
//!
//! The trainer POSTs one JSON object per batch to the server's URL:
//!
//! ```json
//! {
//!   "protocol": "portaflow-reward/1",
//!   "reward": "geneval",
//!   "prompts": ["a photo of a red circle", "..."],
//!   "metadata": [{"task": "shapes", "tag": "single_object", "include": [...], ...},
//!                {"task": "digits", "prompt": "the number \"37\""}],
//!   "images": ["<base64 of a PNG file>", "..."]
//! }
//! ```
//!
//! `metadata[i]` is the prompt's task: GenEval's metadata line (with `"task": "shapes"`) or a
//! digits prompt. The server answers `200` with
//!
//! ```json
//! {"scores": [0.75, null, ...], "success": [false, null, ...],
//!  "boxes": [[{"label": "misalignment", "box": [0.1, 0.2, 0.4, 0.5], "importance": 80}], [], ...]}
//! ```
//!
//! - `scores` (required): one per image; `null` = this reward does not judge that prompt
//!   (multi-reward training masks it). `NaN` / `Infinity` (as Python's `json` writes them) are
//!   accepted and reach the trainer as non-finite rewards, which it leaves out with a warning.
//! - `success` (optional): strict correctness per image, for accuracy curves; default
//!   `score == 1`.
//! - `boxes` (optional): BoxFlow's defect boxes per image for spatial training: `label`
//!   `artifact` or `misalignment`, `box` = `[x0, y0, x1, y1]` as fractions of the image (y down),
//!   optional `importance` 0–100.
//!
//! Errors: a non-200 answer carries a message in its body. The client retries connection
//! failures, timeouts, 5xx / 429 answers and malformed answers with exponential backoff, then
//! fails with the last error; 4xx answers (the request itself is wrong) are not retried.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::boxes::DefectBox;
use super::http;
use super::{Reward, RewardError, Score, Scored, Task};
use crate::image_io;
use crate::world::render::Image;

pub const PROTOCOL: &str = "portaflow-reward/1";

/// One scoring request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScoreRequest {
    pub protocol: String,
    #[serde(default)]
    pub reward: Option<String>,
    pub prompts: Vec<String>,
    pub metadata: Vec<Task>,
    /// Base64 PNG files.
    pub images: Vec<String>,
}

/// A score as sent: a number, `null`, or a non-finite number spelled out.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScoreValue {
    Number(f64),
    Special(String),
}

/// The answer to a [`ScoreRequest`].
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ScoreResponse {
    pub scores: Vec<Option<ScoreValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<Vec<Option<bool>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<Option<Vec<DefectBox>>>>,
}

/// Where and how patiently to ask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// `http://host:port/path` of the server.
    pub url: String,
    /// The reward's name, sent to the server (one server may offer several).
    pub name: String,
    /// Seconds to wait for a connection and for each read of the answer.
    pub timeout_seconds: f64,
    /// Attempts after the first.
    pub retries: usize,
    /// Wait before the first retry; doubled each time, at most 30 s.
    pub backoff_seconds: f64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            name: "remote".into(),
            timeout_seconds: 60.0,
            retries: 3,
            backoff_seconds: 1.0,
        }
    }
}

impl RemoteConfig {
    pub fn validate(&self) -> Result<(), String> {
        http::split_url(&self.url).map_err(|e| format!("data.remote.url: {e}"))?;
        if !(self.timeout_seconds > 0.0 && self.timeout_seconds.is_finite()) {
            return Err(format!(
                "data.remote.timeout_seconds must be positive, got {}",
                self.timeout_seconds
            ));
        }
        if !(self.backoff_seconds >= 0.0 && self.backoff_seconds.is_finite()) {
            return Err(format!(
                "data.remote.backoff_seconds must be ≥ 0, got {}",
                self.backoff_seconds
            ));
        }
        Ok(())
    }
}

/// A reward server as a [`Reward`].
pub struct RemoteReward {
    config: RemoteConfig,
}

impl RemoteReward {
    pub fn new(config: RemoteConfig) -> Result<Self, RewardError> {
        config.validate().map_err(RewardError::Config)?;
        Ok(Self { config })
    }

    /// Scores and defect boxes of one batch, with retries.
    fn ask(&self, images: &[Image], tasks: &[Task]) -> Result<Scored, RewardError> {
        let request = ScoreRequest {
            protocol: PROTOCOL.into(),
            reward: Some(self.config.name.clone()),
            prompts: tasks.iter().map(|t| t.prompt().to_string()).collect(),
            metadata: tasks.to_vec(),
            images: images
                .iter()
                .map(|image| base64_encode(&image_io::encode_png(image)))
                .collect(),
        };
        let body = serde_json::to_vec(&request).expect("a request serialises");
        let timeout = Duration::from_secs_f64(self.config.timeout_seconds);
        let mut backoff = Duration::from_secs_f64(self.config.backoff_seconds);
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = http::post_json(&self.config.url, &body, timeout)
                .map_err(|e| (true, e.to_string()))
                .and_then(|(status, answer)| parse_answer(status, &answer, images.len()));
            match outcome {
                Ok(scores) => return Ok(scores),
                Err((retry, message)) if retry && attempt <= self.config.retries => {
                    tracing::warn!(
                        "reward server {} (attempt {attempt} of {}): {message}; retrying in {:.1} s",
                        self.config.url,
                        self.config.retries + 1,
                        backoff.as_secs_f64()
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err((_, message)) => {
                    return Err(RewardError::Remote {
                        url: self.config.url.clone(),
                        attempts: attempt,
                        seconds: start.elapsed().as_secs_f64(),
                        message,
                    });
                }
            }
        }
    }
}

impl Reward for RemoteReward {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn score(&self, images: &[Image], tasks: &[Task]) -> Result<Vec<Option<Score>>, RewardError> {
        Ok(self.ask(images, tasks)?.scores)
    }

    fn score_with_boxes(&self, images: &[Image], tasks: &[Task]) -> Result<Scored, RewardError> {
        self.ask(images, tasks)
    }
}

/// Checks an answer; `Err((retry, message))`.
fn parse_answer(status: u16, body: &[u8], images: usize) -> Result<Scored, (bool, String)> {
    let text = String::from_utf8_lossy(body);
    if status != 200 {
        let retry = status >= 500 || status == 429;
        return Err((retry, format!("HTTP {status}: {}", excerpt(&text))));
    }
    let cleaned = quote_non_finite(&text);
    let response: ScoreResponse = serde_json::from_str(&cleaned).map_err(|e| {
        (
            true,
            format!(
                "the answer is not a score response ({e}): {}",
                excerpt(&text)
            ),
        )
    })?;
    if response.scores.len() != images {
        return Err((
            true,
            format!("sent {images} images, got {} scores", response.scores.len()),
        ));
    }
    let success = response.success.unwrap_or_default();
    if !success.is_empty() && success.len() != images {
        return Err((
            true,
            format!("sent {images} images, got {} success flags", success.len()),
        ));
    }
    let mut scores = Vec::with_capacity(images);
    for (i, value) in response.scores.into_iter().enumerate() {
        let reward = match value {
            None => {
                scores.push(None);
                continue;
            }
            Some(ScoreValue::Number(v)) => v as f32,
            Some(ScoreValue::Special(s)) => match s.as_str() {
                "NaN" => f32::NAN,
                "Infinity" => f32::INFINITY,
                "-Infinity" => f32::NEG_INFINITY,
                other => {
                    return Err((true, format!("score {i} is the string {other:?}")));
                }
            },
        };
        let success = success.get(i).copied().flatten().unwrap_or(reward == 1.0);
        scores.push(Some(Score { reward, success }));
    }
    let boxes = match response.boxes {
        None => vec![Vec::new(); images],
        Some(boxes) if boxes.len() != images => {
            return Err((
                true,
                format!("sent {images} images, got {} box lists", boxes.len()),
            ));
        }
        Some(boxes) => {
            let boxes: Vec<Vec<DefectBox>> =
                boxes.into_iter().map(Option::unwrap_or_default).collect();
            for (i, list) in boxes.iter().enumerate() {
                for b in list {
                    let [x0, y0, x1, y1] = b.bbox;
                    let inside = |v: f32| (0.0..=1.0).contains(&v);
                    if !(inside(x0)
                        && inside(y0)
                        && inside(x1)
                        && inside(y1)
                        && x0 <= x1
                        && y0 <= y1)
                    {
                        return Err((
                            true,
                            format!(
                                "image {i}: box {:?} is not [x0, y0, x1, y1] fractions of the image",
                                b.bbox
                            ),
                        ));
                    }
                }
            }
            boxes
        }
    };
    Ok(Scored { scores, boxes })
}

/// The start of a body for an error message.
fn excerpt(text: &str) -> String {
    const SHOWN: usize = 200;
    let trimmed = text.trim();
    match trimmed.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{}…", &trimmed[..i]),
        None => trimmed.to_string(),
    }
}

/// Python's `json.dumps` writes bare `NaN` / `Infinity` / `-Infinity`, which are not JSON; quote
/// them (outside strings) so they parse as [`ScoreValue::Special`].
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(token) = token {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, whitespace ignored).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for (i, c) in text.bytes().enumerate() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return Err(format!("byte {i} ({:?}) is not base64", c as char)),
        };
        acc = acc << 6 | value as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_the_rfc_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), coded);
            assert_eq!(base64_decode(coded).unwrap(), plain.as_bytes());
        }
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        assert!(base64_decode("Zm9v!").unwrap_err().contains("byte 4"));
    }

    #[test]
    fn answers_are_checked_against_the_request() {
        let ok = parse_answer(200, br#"{"scores": [0.5, null, 1.0]}"#, 3).unwrap();
        assert_eq!(
            ok.scores,
            vec![
                Some(Score {
                    reward: 0.5,
                    success: false
                }),
                None,
                Some(Score {
                    reward: 1.0,
                    success: true
                })
            ]
        );
        // Python's json writes NaN; it arrives as a non-finite reward, strings untouched.
        let nan = parse_answer(200, br#"{"scores": [NaN, -Infinity], "note": "NaN"}"#, 2);
        let nan = nan.unwrap().scores;
        assert!(nan[0].unwrap().reward.is_nan());
        assert_eq!(nan[1].unwrap().reward, f32::NEG_INFINITY);
        let (retry, message) = parse_answer(200, br#"{"scores": [1.0]}"#, 2).unwrap_err();
        assert!(
            retry && message.contains("sent 2 images, got 1 scores"),
            "{message}"
        );
        let (retry, message) = parse_answer(200, b"<html>oops</html>", 1).unwrap_err();
        assert!(retry && message.contains("<html>oops"), "{message}");
        let (retry, message) = parse_answer(400, b"unknown task", 1).unwrap_err();
        assert!(
            !retry && message.contains("HTTP 400: unknown task"),
            "{message}"
        );
        let (retry, _) = parse_answer(503, b"busy", 1).unwrap_err();
        assert!(retry);
        let (_, message) = parse_answer(
            200,
            br#"{"scores": [1.0], "boxes": [[{"label": "artifact", "box": [0.5, 0.1, 1.5, 0.2]}]]}"#,
            1,
        )
        .unwrap_err();
        assert!(message.contains("not [x0, y0, x1, y1]"), "{message}");
        let boxed = parse_answer(
            200,
            br#"{"scores": [1.0, 0.5], "boxes": [null, [{"label": "misalignment", "box": [0.1, 0.1, 0.3, 0.4], "importance": 60}]]}"#,
            2,
        )
        .unwrap();
        assert_eq!(boxed.boxes[0], vec![]);
        assert_eq!(boxed.boxes[1][0].importance, Some(60.0));
    }
}
