//! An S3 reader of its own for the tests and the bench: GET, HEAD-like
//! listing, PUT and DELETE of objects with AWS Signature V4, over a plain
//! HTTP/1.1 connection (one per request). It shares no code with the
//! server's S3 tier, so what the tests read from the bucket is what the
//! store holds, not what the server thinks it wrote. Path-style requests,
//! `http://` only (the tests' Garage listens on 127.0.0.1).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Where and as whom to reach a bucket.
#[derive(Clone, Debug)]
pub struct Bucket {
    /// `host:port` of the S3 API.
    pub host: String,
    pub bucket: String,
    pub region: String,
    pub key_id: String,
    pub secret: String,
}

/// One answer: status, headers (names lower-cased) and, unless streamed, the body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// An answer's status line and headers, the reader at its body.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    rd: BufReader<TcpStream>,
}

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

impl Bucket {
    /// The object's bytes, or None when the store says 404.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let mut body = Vec::new();
        let found = self.get_to(key, &mut |b| body.extend_from_slice(b))?;
        Ok(found.map(|_| body))
    }

    /// Stream the object's bytes into `sink` (bounded memory, for large
    /// objects); Some(length) or None on 404.
    pub fn get_to(&self, key: &str, sink: &mut dyn FnMut(&[u8])) -> Result<Option<u64>, String> {
        let path = self.object_path(key);
        let Head { status, headers, mut rd } = self.send("GET", &path, &[], &[])?;
        if status == 404 {
            return Ok(None);
        }
        if status != 200 {
            let body = read_body(&headers, &mut rd)?;
            return Err(format!("GET {key}: HTTP {status}: {}", String::from_utf8_lossy(&body)));
        }
        let len = content_length(&headers).ok_or(format!("GET {key}: no Content-Length"))?;
        let mut left = len;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = rd.read(&mut buf[..want]).map_err(|e| format!("GET {key}: {e}"))?;
            if n == 0 {
                return Err(format!("GET {key}: body ended {left} bytes early"));
            }
            sink(&buf[..n]);
            left -= n as u64;
        }
        Ok(Some(len))
    }

    /// Every object under `prefix`: (key, size), in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, String> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q =
                vec![("list-type".to_string(), "2".to_string()), ("prefix".to_string(), prefix.to_string())];
            if let Some(t) = &token {
                q.push(("continuation-token".to_string(), t.clone()));
            }
            let path = format!("/{}", self.bucket);
            let a = self.request("GET", &path, &q, &[])?;
            if a.status != 200 {
                return Err(format!(
                    "list {prefix:?}: HTTP {}: {}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                ));
            }
            let xml = String::from_utf8_lossy(&a.body).into_owned();
            for item in xml.split("<Contents>").skip(1) {
                let key = tag(item, "Key").map(xml_unescape).ok_or("list: <Contents> without <Key>")?;
                let size = tag(item, "Size")
                    .and_then(|s| s.parse().ok())
                    .ok_or("list: <Contents> without <Size>")?;
                out.push((key, size));
            }
            if tag(&xml, "IsTruncated") != Some("true") {
                break;
            }
            token = tag(&xml, "NextContinuationToken").map(xml_unescape);
            if token.is_none() {
                return Err("list: truncated without a continuation token".into());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Store `body` under `key` (the tests use it to damage an object).
    pub fn put(&self, key: &str, body: &[u8]) -> Result<(), String> {
        let a = self.request("PUT", &self.object_path(key), &[], body)?;
        if a.status != 200 {
            return Err(format!("PUT {key}: HTTP {}: {}", a.status, String::from_utf8_lossy(&a.body)));
        }
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<(), String> {
        let a = self.request("DELETE", &self.object_path(key), &[], &[])?;
        if a.status != 204 && a.status != 200 {
            return Err(format!("DELETE {key}: HTTP {}: {}", a.status, String::from_utf8_lossy(&a.body)));
        }
        Ok(())
    }

    /// Does the bucket answer a signed request (the store is up, the key may use the bucket)?
    pub fn ready(&self) -> bool {
        let path = format!("/{}", self.bucket);
        let q = [("list-type".to_string(), "2".to_string()), ("max-keys".to_string(), "1".to_string())];
        matches!(self.request("GET", &path, &q, &[]), Ok(a) if a.status == 200)
    }

    fn object_path(&self, key: &str) -> String {
        format!("/{}/{}", self.bucket, uri_encode(key, false))
    }

    /// One signed request with the whole answer read.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: &[u8],
    ) -> Result<Answer, String> {
        let Head { status, headers, mut rd } = self.send(method, path, query, body)?;
        let body = if method == "HEAD" { Vec::new() } else { read_body(&headers, &mut rd)? };
        Ok(Answer { status, headers, body })
    }

    /// Send a signed request; the status, headers and the reader positioned at the body.
    fn send(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: &[u8],
    ) -> Result<Head, String> {
        let now = amz_now();
        let payload_hash =
            if body.is_empty() { EMPTY_SHA256.to_string() } else { hex(&Sha256::digest(body)) };
        let mut q: Vec<(String, String)> =
            query.iter().map(|(k, v)| (uri_encode(k, true), uri_encode(v, true))).collect();
        q.sort();
        let canonical_query = q.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let canonical_request = format!(
            "{method}\n{path}\n{canonical_query}\nhost:{}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{}\n\n{signed_headers}\n{payload_hash}",
            self.host, now.stamp
        );
        let scope = format!("{}/{}/s3/aws4_request", now.day, self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
            now.stamp,
            hex(&Sha256::digest(canonical_request.as_bytes()))
        );
        let mut k = hmac(format!("AWS4{}", self.secret).as_bytes(), now.day.as_bytes());
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            k = hmac(&k, part.as_bytes());
        }
        let signature = hex(&hmac(&k, to_sign.as_bytes()));
        let target =
            if canonical_query.is_empty() { path.to_string() } else { format!("{path}?{canonical_query}") };
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nx-amz-date: {}\r\nx-amz-content-sha256: {payload_hash}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.host,
            now.stamp,
            self.key_id,
            body.len()
        );
        let mut s = TcpStream::connect(&self.host).map_err(|e| format!("connect {}: {e}", self.host))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
        s.write_all(head.as_bytes())
            .and_then(|_| s.write_all(body))
            .map_err(|e| format!("send to {}: {e}", self.host))?;
        let mut rd = BufReader::new(s);
        let mut line = String::new();
        rd.read_line(&mut line).map_err(|e| format!("read status: {e}"))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(format!("bad status line {line:?}"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            rd.read_line(&mut line).map_err(|e| format!("read headers: {e}"))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Ok(Head { status, headers, rd })
    }
}

fn content_length(headers: &[(String, String)]) -> Option<u64> {
    headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok())
}

/// The whole body: by Content-Length, chunked, or to the end of the connection.
fn read_body(headers: &[(String, String)], rd: &mut BufReader<TcpStream>) -> Result<Vec<u8>, String> {
    let chunked =
        headers.iter().any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        let mut line = String::new();
        loop {
            line.clear();
            rd.read_line(&mut line).map_err(|e| format!("read chunk size: {e}"))?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            rd.read_exact(&mut body[start..]).map_err(|e| format!("read chunk: {e}"))?;
            line.clear();
            rd.read_line(&mut line).map_err(|e| format!("read chunk end: {e}"))?;
        }
    } else if let Some(len) = content_length(headers) {
        body.resize(len as usize, 0);
        rd.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
    } else {
        rd.read_to_end(&mut body).map_err(|e| format!("read body: {e}"))?;
    }
    Ok(body)
}

/// The text of the first `<name>...</name>` in `xml`.
fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(&xml[start..end])
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters kept, `/`
/// kept in paths, everything else `%XX`.
pub fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

struct AmzNow {
    /// `YYYYMMDDTHHMMSSZ`
    stamp: String,
    /// `YYYYMMDD`
    day: String,
}

fn amz_now() -> AmzNow {
    // "2026-11-25T17:56:33Z" -> "20261125T175633Z".
    let stamp: String =
        backupd::worker::db::now_iso8601().chars().filter(|c| *c != '-' && *c != ':').collect();
    AmzNow { day: stamp[..8].to_string(), stamp }
}

#[cfg(test)]
mod tests {
    // The bench includes this file too; there (no test harness) `#[test]`
    // functions are dropped and the import would be unused.
    #[allow(unused_imports)]
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
