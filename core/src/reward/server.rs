//! The reference reward server of the [`remote`](super::remote) protocol: any [`Reward`] behind
//! `POST /` (`portaflow reward-server`); `GET /health` names it. One thread per connection.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use super::http::{self, HttpError};
use super::remote::{PROTOCOL, ScoreRequest, ScoreResponse, ScoreValue, base64_decode};
use super::{Reward, Score};
use crate::image_io;

/// Serves `reward` on `listener` until the process ends.
pub fn serve(listener: TcpListener, reward: Arc<dyn Reward>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let reward = reward.clone();
        std::thread::spawn(move || handle_connection(stream, &*reward));
    }
}

/// Binds `addr` (port 0: any free port) and serves on a background thread; returns the address.
pub fn spawn(addr: &str, reward: Arc<dyn Reward>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::spawn(move || serve(listener, reward));
    Ok(local)
}

/// Answers one connection's request with `reward`.
pub fn handle_connection(stream: TcpStream, reward: &dyn Reward) {
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    let (status, body) = match http::read_request(&stream) {
        Ok(request) => respond(&request, reward),
        Err(HttpError::Io(_)) => return,
        Err(e) => (400, e.to_string()),
    };
    let content_type = if status == 200 {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let _ = http::write_response(&stream, status, content_type, body.as_bytes());
}

fn respond(request: &http::Request, reward: &dyn Reward) -> (u16, String) {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/health") => (
            200,
            serde_json::json!({"protocol": PROTOCOL, "reward": reward.name()}).to_string(),
        ),
        ("POST", _) => match score(&request.body, reward) {
            Ok(response) => (200, serde_json::to_string(&response).expect("json")),
            Err(error) => error,
        },
        _ => (405, "POST a score request, or GET /health".into()),
    }
}

fn score(body: &[u8], reward: &dyn Reward) -> Result<ScoreResponse, (u16, String)> {
    let bad = |message: String| (400, message);
    let request: ScoreRequest =
        serde_json::from_slice(body).map_err(|e| bad(format!("not a {PROTOCOL} request: {e}")))?;
    if request.protocol != PROTOCOL {
        return Err(bad(format!(
            "protocol {:?}; this server speaks {PROTOCOL:?}",
            request.protocol
        )));
    }
    let n = request.images.len();
    if request.metadata.len() != n || request.prompts.len() != n {
        return Err(bad(format!(
            "{n} images, {} metadata lines and {} prompts: one of each per image",
            request.metadata.len(),
            request.prompts.len()
        )));
    }
    let images = request
        .images
        .iter()
        .enumerate()
        .map(|(i, coded)| {
            let bytes = base64_decode(coded).map_err(|e| bad(format!("image {i}: {e}")))?;
            image_io::decode_png(&bytes, &format!("image {i}"))
                .map_err(|e| bad(format!("image {i}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scored = reward
        .score_with_boxes(&images, &request.metadata)
        .map_err(|e| (500, e.to_string()))?;
    let scores = scored.scores;
    let value = |s: &Option<Score>| {
        s.map(|s| match s.reward {
            r if r.is_finite() => ScoreValue::Number(r as f64),
            r if r.is_nan() => ScoreValue::Special("NaN".into()),
            r if r > 0.0 => ScoreValue::Special("Infinity".into()),
            _ => ScoreValue::Special("-Infinity".into()),
        })
    };
    Ok(ScoreResponse {
        scores: scores.iter().map(value).collect(),
        success: Some(scores.iter().map(|s| s.map(|s| s.success)).collect()),
        boxes: Some(scored.boxes.into_iter().map(Some).collect()),
    })
}
