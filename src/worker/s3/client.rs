//! The bucket client: blocking requests (ureq) signed by rusty-s3 (a
//! sans-I/O signer: each request is a presigned URL), path-style addressing.
//!
//! Uploads stream from disk and never hold a file in memory: a file of at
//! most [`PART_SIZE`] is one PUT, a larger one a multipart upload of
//! `PART_SIZE` parts. Each body is read twice from the file (once for its
//! MD5, once to send it), sent with `Content-MD5` (the store refuses a body
//! that does not match) and its ETag compared with that MD5; a multipart
//! object's size is checked with a HEAD once completed. Error messages
//! carry the kind of failure and the store's error code, never a URL (a
//! presigned URL is a credential for its request) nor a secret.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::time::Duration;

use base64::Engine as _;
use md5::{Digest, Md5};
use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CompleteMultipartUploadResponse, CreateMultipartUpload,
    DeleteObject, GetObject, HeadObject, ListObjectsV2, PutObject, S3Action, UploadPart,
};
use rusty_s3::{Credentials, UrlStyle};

use super::{object_key, relative_of_key};
use crate::config::s3::Settings;

/// Files larger than this go up as multipart uploads of parts this large.
pub const PART_SIZE: u64 = 16 << 20;

/// How long a presigned URL stays valid (it is used at once).
const SIGNED_FOR: Duration = Duration::from_secs(3600);

/// What went wrong, by kind (the replicator logs one line per kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Connection refused, reset, DNS: the store is not there.
    Unreachable,
    /// No answer within `--s3-timeout`.
    Timeout,
    /// 401/403: wrong credentials, clock skew or no permission on the bucket.
    Denied,
    /// 5xx (500, 503 SlowDown...): the store is there but failing.
    Server,
    /// Another refusal (4xx) or an answer we cannot read.
    Refused,
    /// The store's checksum or size does not match what was sent.
    Integrity,
    /// Reading the local file failed.
    Local,
}

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub detail: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for Error {}

fn err(kind: Kind, detail: impl Into<String>) -> Error {
    Error { kind, detail: detail.into() }
}

fn local(e: io::Error) -> Error {
    err(Kind::Local, e.to_string())
}

/// A ureq error as an [`Error`]: the status and the store's `<Code>`, or
/// the transport failure's kind and cause, without the URL.
fn classify(e: ureq::Error) -> Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let mut body = String::new();
            let _ = resp.into_reader().take(4096).read_to_string(&mut body);
            let s3_code = body
                .split_once("<Code>")
                .and_then(|(_, r)| r.split_once("</Code>"))
                .map(|(c, _)| c.chars().filter(|c| c.is_ascii_alphanumeric()).take(64).collect::<String>())
                .unwrap_or_default();
            let kind = match code {
                401 | 403 => Kind::Denied,
                500..=599 => Kind::Server,
                _ => Kind::Refused,
            };
            err(kind, format!("HTTP {code} {s3_code}").trim_end().to_string())
        }
        ureq::Error::Transport(t) => {
            let cause = std::error::Error::source(&t).map(|s| s.to_string()).unwrap_or_default();
            let text = format!("{} {}", t.message().unwrap_or(""), cause);
            let timed_out = text.contains("timed out") || text.contains("WouldBlock");
            let kind = if timed_out { Kind::Timeout } else { Kind::Unreachable };
            err(kind, format!("{:?} {}", t.kind(), text.trim()))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The MD5 of the next `len` bytes of `f` (which is left where it was).
fn md5_of(f: &mut File, len: u64) -> Result<[u8; 16], Error> {
    let start = f.stream_position().map_err(local)?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = f.read(&mut buf[..want]).map_err(local)?;
        if n == 0 {
            return Err(err(Kind::Local, "the file is shorter than its size"));
        }
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.seek(SeekFrom::Start(start)).map_err(local)?;
    let mut out = [0u8; 16];
    out.copy_from_slice(h.finalize().as_slice());
    Ok(out)
}

/// An ETag as the store sends it, without its quotes.
fn etag(resp: &ureq::Response) -> String {
    resp.header("etag").unwrap_or("").trim_matches('"').to_string()
}

/// What each object says of itself (`x-amz-meta-*` headers), so that the
/// bucket alone is enough to restore and verify it: the name of its client
/// (percent-encoded UTF-8), its size and POSIX cksum, and when it was stored
/// (seconds since the epoch: the local file's modification time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub client: String,
    pub size: u64,
    pub cksum: u32,
    pub stored: i64,
}

impl Meta {
    /// The headers, sorted by name (as rusty-s3 signs them).
    fn headers(&self) -> [(&'static str, String); 4] {
        [
            ("x-amz-meta-cksum", self.cksum.to_string()),
            ("x-amz-meta-client", percent_encode(&self.client)),
            ("x-amz-meta-size", self.size.to_string()),
            ("x-amz-meta-stored", self.stored.to_string()),
        ]
    }

    /// The URL of `action` signed with the headers of `meta` (if any)...
    fn sign<'a, A: S3Action<'a>>(meta: Option<&Meta>, mut action: A) -> impl AsRef<str> {
        for (k, v) in meta.map(Meta::headers).into_iter().flatten() {
            action.headers_mut().insert(k, v);
        }
        action.sign(SIGNED_FOR)
    }

    /// ... and the request that sends them.
    fn set(meta: Option<&Meta>, mut req: ureq::Request) -> ureq::Request {
        for (k, v) in meta.map(Meta::headers).into_iter().flatten() {
            req = req.set(k, &v);
        }
        req
    }

    /// The metadata of an answer (None for an object stored without it).
    fn of(resp: &ureq::Response) -> Option<Meta> {
        let get = |k: &str| resp.header(&format!("x-amz-meta-{k}"));
        Some(Meta {
            client: percent_decode(get("client")?)?,
            size: get("size")?.parse().ok()?,
            cksum: get("cksum")?.parse().ok()?,
            stored: get("stored")?.parse().ok()?,
        })
    }
}

/// Header-safe text: bytes outside `[A-Za-z0-9._-]` as `%XX`.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// One bucket (with the prefix of this box's keys) and a client for it.
pub struct Bucket {
    bucket: rusty_s3::Bucket,
    creds: Credentials,
    agent: ureq::Agent,
    prefix: String,
}

impl Bucket {
    pub fn new(s: &Settings) -> Result<Bucket, String> {
        let url = s.endpoint.parse().map_err(|e| format!("--s3-endpoint {:?}: {e}", s.endpoint))?;
        let bucket = rusty_s3::Bucket::new(url, UrlStyle::Path, s.bucket.clone(), s.region.clone())
            .map_err(|e| format!("--s3-endpoint/--s3-bucket: {e}"))?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(s.timeout.min(Duration::from_secs(10)))
            .timeout_read(s.timeout)
            .timeout_write(s.timeout)
            .redirects(0)
            .build();
        let creds = Credentials::new(s.access_key.clone(), s.secret_key.0.clone());
        Ok(Bucket { bucket, creds, agent, prefix: s.prefix.clone() })
    }

    fn key(&self, rel: &str) -> String {
        object_key(&self.prefix, rel)
    }

    fn request(&self, method: &str, url: &impl AsRef<str>) -> ureq::Request {
        self.agent.request(method, url.as_ref())
    }

    /// Upload the local file `f` as the object of `rel` (a path relative to
    /// the data directory), with `meta` as its metadata. Returns the bytes sent.
    pub fn put_file(&self, rel: &str, f: &mut File, meta: Option<&Meta>) -> Result<u64, Error> {
        let size = f.metadata().map_err(local)?.len();
        f.seek(SeekFrom::Start(0)).map_err(local)?;
        let key = self.key(rel);
        if size <= PART_SIZE {
            let action = PutObject::new(&self.bucket, Some(&self.creds), &key);
            let url = Meta::sign(meta, action);
            self.send_body(Meta::set(meta, self.request("PUT", &url)), f, size)?;
            return Ok(size);
        }
        let action = CreateMultipartUpload::new(&self.bucket, Some(&self.creds), &key);
        let url = Meta::sign(meta, action);
        let body = Meta::set(meta, self.request("POST", &url))
            .call()
            .map_err(classify)?
            .into_string()
            .map_err(local)?;
        let created = CreateMultipartUpload::parse_response(&body)
            .map_err(|e| err(Kind::Refused, format!("CreateMultipartUpload answer: {e}")))?;
        let upload_id = created.upload_id().to_string();
        match self.put_parts(&key, &upload_id, f, size) {
            Ok(()) => Ok(size),
            Err(e) => {
                // Best effort: parts left behind cost space until aborted.
                let url = AbortMultipartUpload::new(&self.bucket, Some(&self.creds), &key, &upload_id)
                    .sign(SIGNED_FOR);
                let _ = self.request("DELETE", &url).call();
                Err(e)
            }
        }
    }

    /// Send the next `len` bytes of `f` as the body of `req`, with their MD5;
    /// the ETag answered must be that MD5.
    fn send_body(&self, req: ureq::Request, f: &mut File, len: u64) -> Result<String, Error> {
        let md5 = md5_of(f, len)?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(md5);
        let resp = req
            .set("Content-Length", &len.to_string())
            .set("Content-MD5", &b64)
            .send(Read::by_ref(f).take(len))
            .map_err(classify)?;
        let tag = etag(&resp);
        if !tag.is_empty() && tag != hex(&md5) {
            return Err(err(Kind::Integrity, format!("ETag {tag:?} is not the MD5 of what was sent")));
        }
        Ok(hex(&md5))
    }

    fn put_parts(&self, key: &str, upload_id: &str, f: &mut File, size: u64) -> Result<(), Error> {
        let mut etags = Vec::new();
        let mut offset = 0;
        while offset < size {
            let len = PART_SIZE.min(size - offset);
            let number = u16::try_from(etags.len() + 1).map_err(|_| err(Kind::Local, "too many parts"))?;
            let url =
                UploadPart::new(&self.bucket, Some(&self.creds), key, number, upload_id).sign(SIGNED_FOR);
            f.seek(SeekFrom::Start(offset)).map_err(local)?;
            etags.push(self.send_body(self.request("PUT", &url), f, len)?);
            offset += len;
        }
        let action = CompleteMultipartUpload::new(
            &self.bucket,
            Some(&self.creds),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGNED_FOR);
        let body = self.request("POST", &url).send_string(&action.body()).map_err(classify)?;
        let body = body.into_string().map_err(local)?;
        // A 200 may still carry an <Error>.
        CompleteMultipartUploadResponse::parse(&body)
            .map_err(|_| err(Kind::Server, "CompleteMultipartUpload did not complete"))?;
        match self.head_key(key)? {
            Some(n) if n == size => Ok(()),
            other => {
                Err(err(Kind::Integrity, format!("object size {other:?} after upload, expected {size}")))
            }
        }
    }

    fn head_key(&self, key: &str) -> Result<Option<u64>, Error> {
        Ok(self.head_meta_key(key)?.map(|(size, _)| size))
    }

    /// The size and metadata of the object at `key`, None when the bucket lacks it.
    fn head_meta_key(&self, key: &str) -> Result<Option<(u64, Option<Meta>)>, Error> {
        let url = HeadObject::new(&self.bucket, Some(&self.creds), key).sign(SIGNED_FOR);
        match self.request("HEAD", &url).call() {
            Ok(resp) => {
                let size = resp.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                Ok(Some((size, Meta::of(&resp))))
            }
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    /// The size and metadata of the object of `rel`, None when the bucket lacks it.
    pub fn head(&self, rel: &str) -> Result<Option<(u64, Option<Meta>)>, Error> {
        self.head_meta_key(&self.key(rel))
    }

    /// A reader of the object of `rel` (streamed) and its metadata, None
    /// when the bucket lacks it.
    #[allow(clippy::type_complexity)]
    pub fn get(&self, rel: &str) -> Result<Option<(Box<dyn Read + Send + Sync>, Option<Meta>)>, Error> {
        let key = self.key(rel);
        let url = GetObject::new(&self.bucket, Some(&self.creds), &key).sign(SIGNED_FOR);
        match self.request("GET", &url).call() {
            Ok(resp) => {
                let meta = Meta::of(&resp);
                Ok(Some((resp.into_reader(), meta)))
            }
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    /// Delete the object of `rel` (done too when it was not there).
    pub fn delete(&self, rel: &str) -> Result<(), Error> {
        let key = self.key(rel);
        let url = DeleteObject::new(&self.bucket, Some(&self.creds), &key).sign(SIGNED_FOR);
        match self.request("DELETE", &url).call() {
            Ok(_) | Err(ureq::Error::Status(404, _)) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Every object below `rel_dir` (e.g. `files/`), as (path relative to
    /// the data directory, size).
    pub fn list(&self, rel_dir: &str) -> Result<Vec<(String, u64)>, Error> {
        let prefix = self.key(rel_dir);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, Some(&self.creds));
            action.with_prefix(prefix.as_str());
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGNED_FOR);
            let body = self.request("GET", &url).call().map_err(classify)?.into_string().map_err(local)?;
            let page = ListObjectsV2::parse_response(&body)
                .map_err(|e| err(Kind::Refused, format!("ListObjectsV2 answer: {e}")))?;
            for c in page.contents {
                if let Some(rel) = relative_of_key(&self.prefix, &c.key) {
                    out.push((rel.to_string(), c.size.unwrap_or(0)));
                }
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::other(e)
    }
}

/// The bucket behind the storage seam (see [`crate::worker::storage::tier`]).
impl crate::worker::storage::tier::Tier for Bucket {
    fn publish(&self, rel: &str, src: &mut File) -> io::Result<u64> {
        Ok(self.put_file(rel, src, None)?)
    }

    fn open(&self, rel: &str) -> io::Result<Option<Box<dyn Read + Send>>> {
        Ok(self.get(rel)?.map(|(r, _)| Box::new(r) as Box<dyn Read + Send>))
    }

    fn list(&self, top: &str) -> io::Result<Vec<(String, u64)>> {
        Ok(Bucket::list(self, &format!("{top}/"))?)
    }

    fn delete(&self, rel: &str) -> io::Result<()> {
        Ok(Bucket::delete(self, rel)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, body: &str) -> Error {
        let resp = ureq::Response::new(code, "x", body).unwrap();
        classify(ureq::Error::Status(code, resp))
    }

    #[test]
    fn failures_are_classified_by_kind_without_urls() {
        let e = status(503, "<Error><Code>SlowDown</Code><Message>m</Message></Error>");
        assert_eq!((e.kind, e.detail.as_str()), (Kind::Server, "HTTP 503 SlowDown"));
        assert_eq!(status(500, "oops").kind, Kind::Server);
        let e = status(403, "<Error><Code>SignatureDoesNotMatch</Code></Error>");
        assert_eq!((e.kind, e.detail.as_str()), (Kind::Denied, "HTTP 403 SignatureDoesNotMatch"));
        assert_eq!(status(404, "").kind, Kind::Refused);
        // A store that is not there: no URL (a presigned URL is a credential) in the message.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/bucket/key?X-Amz-Signature=abc");
        let e = classify(ureq::get(&url).call().unwrap_err());
        assert_eq!(e.kind, Kind::Unreachable, "{e}");
        assert!(!e.to_string().contains("Signature") && !e.to_string().contains("/bucket"), "{e}");
    }

    #[test]
    fn metadata_text_round_trips() {
        for name in ["alice", "Zoë's laptop", "a b/c%d", ""] {
            let enc = percent_encode(name);
            assert!(enc.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b)), "{enc}");
            assert_eq!(percent_decode(&enc).as_deref(), Some(name));
        }
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        let names: Vec<&str> = Meta::default().headers().iter().map(|h| h.0).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "rusty-s3 signs headers sorted by name");
    }

    #[test]
    fn md5_of_reads_a_range_and_leaves_the_position() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, b"0123456789").unwrap();
        f.seek(SeekFrom::Start(2)).unwrap();
        let d = md5_of(&mut f, 3).unwrap();
        assert_eq!(hex(&d), hex(Md5::digest(b"234").as_slice()));
        assert_eq!(f.stream_position().unwrap(), 2);
        assert_eq!(md5_of(&mut f, 100).unwrap_err().kind, Kind::Local, "shorter than its size");
    }
}
