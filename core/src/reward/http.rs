//! Just enough HTTP/1.1 over `std::net` for the reward protocol: one POST with a JSON body and
//! its answer (Content-Length or chunked), and the server side's request parsing. Plain `http://`
//! only: reward servers run next to the trainer (same host or cluster), as flow_grpo's do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest body either side accepts (a batch of 64×64 PNGs is well under 1 MiB).
pub const MAX_BODY: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0} is not an http:// URL (expected http://HOST:PORT/PATH)")]
    BadUrl(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0} timed out")]
    Timeout(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
}

/// `http://host[:port][/path]` split into (host:port, path).
pub fn split_url(url: &str) -> Result<(String, String), HttpError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HttpError::BadUrl(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(HttpError::BadUrl(url.into()));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// POSTs `body` as JSON to `url`; returns the status code and body. `timeout` bounds the
/// connection and each read and write.
pub fn post_json(url: &str, body: &[u8], timeout: Duration) -> Result<(u16, Vec<u8>), HttpError> {
    let (authority, path) = split_url(url)?;
    let addr = authority
        .to_socket_addrs()
        .map_err(|source| HttpError::Connect {
            addr: authority.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| HttpError::BadUrl(url.into()))?;
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| match source.kind() {
            std::io::ErrorKind::TimedOut => HttpError::Timeout(format!("connecting to {url}")),
            _ => HttpError::Connect {
                addr: authority.clone(),
                source,
            },
        })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let timed_out = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            HttpError::Timeout(format!("waiting for {url}"))
        }
        _ => HttpError::Io(e),
    };
    let mut writer = &stream;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes()).map_err(timed_out)?;
    writer.write_all(body).map_err(timed_out)?;
    let mut reader = BufReader::new(&stream);
    let status_line = read_line(&mut reader).map_err(timed_out)?;
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| HttpError::Malformed(format!("status line {status_line:?}")))?,
        _ => {
            return Err(HttpError::Malformed(format!("status line {status_line:?}")));
        }
    };
    let headers = read_headers(&mut reader).map_err(timed_out)?;
    let body = read_body(&mut reader, &headers, true).map_err(|e| match e {
        HttpError::Io(io) => timed_out(io),
        other => other,
    })?;
    Ok((status, body))
}

/// A parsed request on the server side.
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one request from `stream`.
pub fn read_request(stream: &TcpStream) -> Result<Request, HttpError> {
    let mut reader = BufReader::new(stream);
    let line = read_line(&mut reader)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Malformed(format!("request line {line:?}")));
    };
    let (method, path) = (method.to_string(), path.to_string());
    let headers = read_headers(&mut reader)?;
    let body = read_body(&mut reader, &headers, false)?;
    Ok(Request { method, path, body })
}

/// Writes a complete response and closes the exchange.
pub fn write_response(
    mut stream: &TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn read_line(reader: &mut impl BufRead) -> Result<String, std::io::Error> {
    let mut line = String::new();
    let n = reader.by_ref().take(64 << 10).read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a complete message",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Header lines up to the blank line, names lower-cased.
fn read_headers(reader: &mut impl BufRead) -> Result<Vec<(String, String)>, std::io::Error> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Ok(headers);
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        if headers.len() > 200 {
            return Err(std::io::Error::other("more than 200 header lines"));
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The body by Content-Length, chunked transfer, or (responses only) up to the end of stream.
fn read_body(
    reader: &mut impl BufRead,
    headers: &[(String, String)],
    until_close: bool,
) -> Result<Vec<u8>, HttpError> {
    if header(headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let line = read_line(reader)?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| HttpError::Malformed(format!("chunk size {line:?}")))?;
            if size == 0 {
                let _ = read_headers(reader)?; // trailers
                return Ok(body);
            }
            if body.len() + size > MAX_BODY {
                return Err(HttpError::Malformed(format!(
                    "body larger than {MAX_BODY} bytes"
                )));
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            read_line(reader)?;
        }
    }
    match header(headers, "content-length") {
        Some(value) => {
            let length: usize = value
                .parse()
                .map_err(|_| HttpError::Malformed(format!("Content-Length {value:?}")))?;
            if length > MAX_BODY {
                return Err(HttpError::Malformed(format!(
                    "Content-Length {length} is over the {MAX_BODY}-byte limit"
                )));
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    HttpError::Malformed(format!(
                        "the connection closed before the {length}-byte body was complete"
                    ))
                } else {
                    HttpError::Io(e)
                }
            })?;
            Ok(body)
        }
        None if until_close => {
            let mut body = Vec::new();
            reader.take(MAX_BODY as u64).read_to_end(&mut body)?;
            Ok(body)
        }
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            split_url("http://localhost:8000/score").unwrap(),
            ("localhost:8000".into(), "/score".into())
        );
        assert_eq!(
            split_url("http://example.org").unwrap(),
            ("example.org:80".into(), "/".into())
        );
        assert!(split_url("https://example.org/").is_err());
        assert!(split_url("http:///x").is_err());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        let raw = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n";
        let headers = vec![("transfer-encoding".to_string(), "chunked".to_string())];
        let body = read_body(&mut &raw[..], &headers, true).unwrap();
        assert_eq!(body, b"Wikipedia");
    }

    #[test]
    fn a_short_body_is_an_error_not_a_hang() {
        let headers = vec![("content-length".to_string(), "10".to_string())];
        let err = read_body(&mut &b"abc"[..], &headers, true).unwrap_err();
        assert!(err.to_string().contains("10-byte body"), "{err}");
    }
}
