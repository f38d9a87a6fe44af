//! The client's files: `me.info` (its identity) and `transfer.info` (what to
//! send where, for the legacy no-argument mode).
//!
//! `me.info`, as written here and by clients in the field:
//!
//! ```text
//! line 1   user name
//! line 2   client id, 32 hex characters (we write lowercase; either case is read)
//! line 3.. base64 of the RSA private key's DER encoding
//! ```
//!
//! We write the key on one line as PKCS#8 (what Crypto++'s `Save` writes and
//! what every client can load). We read the key wrapped over several lines
//! (Crypto++'s `Base64Encoder` wraps at 72 columns, MIME at 76, PEM at 64),
//! with or without `=` padding, with LF, CRLF or lone CR line ends, with a
//! UTF-8 byte order mark, as PKCS#8 or PKCS#1 (PyCryptodome's default
//! `export_key(format="DER")`), and tolerate PEM armour lines. The id is
//! read in either case, with blanks around it.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;

use crate::protocol::{id_hex, parse_id_hex, ClientId};

/// A registered client: its name, its id and its RSA key.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    pub id: ClientId,
    pub key: RsaPrivateKey,
}

impl fmt::Debug for Identity {
    // Never prints key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("id", &id_hex(&self.id))
            .field("key_bits", &(self.key.size() * 8))
            .finish_non_exhaustive()
    }
}

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const B64_STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const B64_URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Strip a UTF-8 byte order mark and split into lines at LF, CRLF or a lone
/// CR (classic Mac line ends), without the line ends.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    text.split('\n').flat_map(|l| l.strip_suffix('\r').unwrap_or(l).split('\r'))
}

/// Decode a DER RSA private key, PKCS#8 or PKCS#1.
pub fn decode_private_key_der(der: &[u8]) -> Result<RsaPrivateKey, String> {
    match RsaPrivateKey::from_pkcs8_der(der) {
        Ok(k) => Ok(k),
        Err(e8) => RsaPrivateKey::from_pkcs1_der(der)
            .map_err(|e1| format!("not an RSA private key in PKCS#8 ({e8}) or PKCS#1 ({e1}) DER")),
    }
}

/// Parse the text of a `me.info` file.
pub fn parse_me_info(text: &str) -> Result<Identity, String> {
    let mut it = lines(text);
    let name = it.next().map(str::trim).unwrap_or("");
    if name.is_empty() {
        return Err("line 1 (the user name) is missing or empty".into());
    }
    let id_line = it.next().ok_or("line 2 (the client id) is missing")?;
    let id = parse_id_hex(id_line).ok_or_else(|| {
        format!("line 2 is not a client id of 32 hex characters: {:?}", truncate(id_line, 40))
    })?;
    let mut b64 = String::new();
    for l in it {
        let l = l.trim();
        if l.starts_with("-----") {
            continue; // PEM armour
        }
        b64.extend(l.chars().filter(|c| !c.is_whitespace()));
    }
    if b64.is_empty() {
        return Err("line 3 (the private key) is missing".into());
    }
    let der = B64_STANDARD
        .decode(&b64)
        .or_else(|_| B64_URL_SAFE.decode(&b64))
        .map_err(|e| format!("the private key is not valid base64: {e}"))?;
    let key = decode_private_key_der(&der)?;
    Ok(Identity { name: name.to_string(), id, key })
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The text of a `me.info` file: name, lowercase hex id, base64 PKCS#8 DER on one line.
pub fn format_me_info(identity: &Identity) -> Result<String, String> {
    let der = identity.key.to_pkcs8_der().map_err(|e| format!("cannot encode the private key: {e}"))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_bytes());
    Ok(format!("{}\n{}\n{}\n", identity.name, id_hex(&identity.id), b64))
}

/// Read and parse a `me.info` file.
pub fn load_identity(path: &Path) -> Result<Identity, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_me_info(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Write `me.info` atomically (see [`write_atomic`]), mode 0600.
pub fn save_identity(path: &Path, identity: &Identity) -> io::Result<()> {
    let text = format_me_info(identity).map_err(io::Error::other)?;
    write_atomic(path, text.as_bytes(), 0o600)
}

/// Whether [`save_identity`] can write `path`, checked before registering so
/// that a new identity is not lost: the temp file [`write_atomic`] would use
/// is created in the same directory and removed again, and `path` is not a
/// folder (a rename cannot replace one). Nothing else is changed.
pub fn check_can_save(path: &Path) -> io::Result<()> {
    let (_, tmp) = temp_path(path)?;
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(io::Error::other("it is a folder"));
    }
    drop(open_temp(&tmp, 0o600)?);
    fs::remove_file(&tmp)
}

/// The directory of `path` and the temp file [`write_atomic`] writes there.
fn temp_path(path: &Path) -> io::Result<(PathBuf, PathBuf)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| io::Error::other("the path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp.{}", file_name.to_string_lossy(), std::process::id()));
    Ok((dir, tmp))
}

fn open_temp(tmp: &Path, mode: u32) -> io::Result<fs::File> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(tmp)
}

/// Write a file atomically: a temp file (`mode`) in the same directory,
/// fsync, rename over `path`, fsync the directory. A crash leaves either the
/// old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (dir, tmp) = temp_path(path)?;
    let result = (|| {
        let mut f = open_temp(&tmp, mode)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The contents of a `transfer.info` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferInfo {
    /// `host:port`.
    pub server: String,
    pub name: String,
    pub files: Vec<PathBuf>,
}

/// Parse `transfer.info`: line 1 `host:port`, line 2 user name, line 3 the
/// file to send, further lines more files. Blank lines after line 2 are skipped.
pub fn parse_transfer_info(text: &str) -> Result<TransferInfo, String> {
    let mut it = lines(text);
    let server = it.next().map(str::trim).unwrap_or("");
    if server.is_empty() {
        return Err("line 1 (host:port of the server) is missing or empty".into());
    }
    let name = it.next().map(str::trim).unwrap_or("");
    if name.is_empty() {
        return Err("line 2 (the user name) is missing or empty".into());
    }
    let files: Vec<PathBuf> = it.map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect();
    if files.is_empty() {
        return Err("line 3 (the file to send) is missing".into());
    }
    Ok(TransferInfo { server: server.to_string(), name: name.to_string(), files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::OnceLock;

    fn key() -> &'static RsaPrivateKey {
        static K: OnceLock<RsaPrivateKey> = OnceLock::new();
        K.get_or_init(|| RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap())
    }

    fn ident() -> Identity {
        Identity { name: "alice".into(), id: [0xAB; 16], key: key().clone() }
    }

    #[test]
    fn round_trip() {
        let text = format_me_info(&ident()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "alice");
        assert_eq!(lines[1], "abababababababababababababababab");
        let back = parse_me_info(&text).unwrap();
        assert_eq!(back.name, "alice");
        assert_eq!(back.id, [0xAB; 16]);
        assert_eq!(&back.key, key());
    }

    #[test]
    fn foreign_formats() {
        let pkcs1 = key().to_pkcs1_der().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs1.as_bytes());
        // Upper-case id, key wrapped at 72 columns, CRLF, trailing blank line.
        let wrapped: Vec<&str> = b64.as_bytes().chunks(72).map(|c| std::str::from_utf8(c).unwrap()).collect();
        let text =
            format!("bob\r\n{}\r\n{}\r\n\r\n", "0123456789ABCDEF0123456789ABCDEF", wrapped.join("\r\n"));
        let id = parse_me_info(&text).unwrap();
        assert_eq!(id.name, "bob");
        assert_eq!(id.id[0], 0x01);
        assert_eq!(&id.key, key());
        // Without padding, with a BOM.
        let text =
            format!("\u{feff}bob\n{}\n{}\n", "0123456789abcdef0123456789abcdef", b64.trim_end_matches('='));
        assert_eq!(&parse_me_info(&text).unwrap().key, key());
    }

    /// Every combination of the habits of other clients is read, and the
    /// canonical form written back is the same whatever was read.
    #[test]
    fn every_foreign_combination() {
        let der1 = key().to_pkcs1_der().unwrap();
        let der8 = key().to_pkcs8_der().unwrap();
        let canonical = format_me_info(&Identity { name: "carl".into(), id: [0xC0; 16], ..ident() }).unwrap();
        let mut n = 0;
        for der in [der1.as_bytes(), der8.as_bytes()] {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            for eol in ["\n", "\r\n", "\r"] {
                for width in [usize::MAX, 64, 72, 76] {
                    let wrapped: Vec<&str> = b64
                        .as_bytes()
                        .chunks(width.min(b64.len()))
                        .map(|c| std::str::from_utf8(c).unwrap())
                        .collect();
                    for (id, end, bom) in [("C0".repeat(16), eol, ""), ("c0".repeat(16), "", "\u{feff}")] {
                        let text = format!("{bom}carl{eol} {id} {eol}{}{end}", wrapped.join(eol));
                        let got = parse_me_info(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                        assert_eq!((got.name.as_str(), got.id), ("carl", [0xC0; 16]), "{text:?}");
                        assert_eq!(&got.key, key());
                        assert_eq!(format_me_info(&got).unwrap(), canonical);
                        n += 1;
                    }
                }
            }
        }
        assert_eq!(n, 48);
    }

    #[test]
    fn bad_files() {
        assert!(parse_me_info("").unwrap_err().contains("line 1"));
        assert!(parse_me_info("a\n").unwrap_err().contains("line 2"));
        assert!(parse_me_info("a\n1234\nAAAA\n").unwrap_err().contains("line 2"));
        assert!(parse_me_info("a\n0123456789abcdef0123456789abcdef\n").unwrap_err().contains("line 3"));
        assert!(parse_me_info("a\n0123456789abcdef0123456789abcdef\n!!!\n").unwrap_err().contains("base64"));
        assert!(parse_me_info("a\n0123456789abcdef0123456789abcdef\nAAAA\n").unwrap_err().contains("PKCS"));
    }

    #[test]
    fn save_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.info");
        fs::write(&path, "old").unwrap();
        save_identity(&path, &ident()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_identity(&path).unwrap().name, "alice");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn check_can_save_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.info");
        check_can_save(&path).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "no temp file left");
        // A parent that is a regular file, a missing parent, a folder in its place.
        fs::write(dir.path().join("file"), "x").unwrap();
        assert!(check_can_save(&dir.path().join("file/me.info")).is_err());
        assert!(check_can_save(&dir.path().join("missing/me.info")).is_err());
        fs::create_dir(&path).unwrap();
        assert!(check_can_save(&path).unwrap_err().to_string().contains("folder"));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temp file left");
    }

    #[test]
    fn transfer_info() {
        let t = parse_transfer_info("127.0.0.1:1234\r\nalice\r\na.txt\n\nb dir/c.txt\n").unwrap();
        assert_eq!(t.server, "127.0.0.1:1234");
        assert_eq!(t.name, "alice");
        assert_eq!(t.files, vec![PathBuf::from("a.txt"), PathBuf::from("b dir/c.txt")]);
        assert!(parse_transfer_info("h:1\nalice\n").is_err());
        assert!(parse_transfer_info("h:1\n\nx\n").is_err());
    }
}
