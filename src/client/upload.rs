//! Uploads on a [`Client`]: the options and outcomes of one upload, the
//! packets streamed from a plaintext source (encrypted and checksummed in the
//! same pass, cut by a [`PacketPlan`]), the 1603 that ends an upload, the
//! 1029/1030/1031 that follow it, and [`Client::send_file`], the whole flow of
//! one file with its cksum retries.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use super::plan::CipherSource;
use super::{
    name_field, Client, ClientError, PacketPlan, PacketSpec, DEFAULT_PACKET_SIZE, MAX_ATTEMPTS, STREAM_CHUNK,
};
use crate::protocol::{
    Code, NameField, PacketHeader, RequestHeader, Response, NAME_FIELD_LEN, PACKET_HEADER_LEN,
    REQUEST_HEADER_LEN, VERSION,
};

/// Plaintext read from the source per read call.
const READ_CHUNK: usize = 256 * 1024;

/// What goes into the `content_size` field of file packets, and how the
/// ciphertext is cut (the three conventions of `PROTOCOL.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentSizeField {
    /// Convention 1: the whole-file ciphertext cut into `packet_size` pieces;
    /// `content_size` is this packet's length.
    #[default]
    ThisPacket,
    /// Convention 2: the whole-file ciphertext cut into `packet_size` pieces;
    /// `content_size` is the whole ciphertext length in every packet;
    /// `total_packets = ciphertext / packet_size + 1`, so when the ciphertext
    /// is a multiple of `packet_size` the last packet is empty.
    WholeFile,
    /// Convention 3: each `packet_size`-byte plaintext chunk is encrypted
    /// separately (own zero IV, own padding); `content_size` is this packet's
    /// ciphertext length and `orig_file_size` the chunk's plaintext length.
    /// When the file size is a non-zero multiple of `packet_size` an extra
    /// packet of empty plaintext (16 bytes of ciphertext) follows; an empty
    /// file is one such packet.
    PerPacketEncrypted,
}

/// Options of one upload.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Content bytes per packet (plaintext bytes per chunk for
    /// [`ContentSizeField::PerPacketEncrypted`]). Default 1 MiB.
    pub packet_size: usize,
    /// Packet convention. Default [`ContentSizeField::ThisPacket`].
    pub content_size: ContentSizeField,
    /// The server answers 1030 with 1604 (wait for it before resending).
    /// When false, a 1604 arriving before the next 1603 is tolerated anyway.
    pub ack_retry: bool,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            packet_size: DEFAULT_PACKET_SIZE,
            content_size: ContentSizeField::ThisPacket,
            ack_retry: false,
        }
    }
}

/// What the server said after the last packet of an upload (its 1603), plus
/// the checksum computed locally over the same plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub server_cksum: u32,
    pub local_cksum: u32,
    /// The server's `content_size` (total ciphertext bytes it received).
    pub content_size: u32,
    /// The file name field echoed by the server.
    pub file_name_field: [u8; NAME_FIELD_LEN],
}

impl Uploaded {
    /// Whether the server's checksum matches ours.
    pub fn cksum_matches(&self) -> bool {
        self.server_cksum == self.local_cksum
    }
}

/// Result of [`Client::send_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The checksums matched and the server acknowledged 1029.
    Verified { cksum: u32, attempts: u32 },
    /// The checksums differed on every attempt; 1031 was sent and acknowledged.
    CksumMismatch { attempts: u32 },
}

impl Client {
    /// Encrypt (streaming, O(packet) memory) and send `size` bytes from `src`
    /// as packets; read the 1603; return what the server said plus the local
    /// cksum. `src` must yield exactly `size` bytes, otherwise
    /// [`ClientError::FileChanged`] is returned before the last packet is sent.
    pub fn upload(
        &mut self,
        file_name: &str,
        src: &mut dyn Read,
        size: u64,
        opts: &UploadOptions,
    ) -> Result<Uploaded, ClientError> {
        self.upload_with_progress(file_name, src, size, opts, &mut |_| {})
    }

    /// [`upload`](Self::upload) calling `progress` after each packet with the
    /// number of plaintext bytes read so far.
    pub fn upload_with_progress(
        &mut self,
        file_name: &str,
        src: &mut dyn Read,
        size: u64,
        opts: &UploadOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Uploaded, ClientError> {
        let key = *self.aes_key.as_ref().ok_or_else(no_key)?;
        let name = name_field(file_name)?;
        let plan = PacketPlan::new(size, opts.packet_size, opts.content_size)
            .map_err(|m| ClientError::local(io::ErrorKind::InvalidInput, m))?;

        let mut plain = std::mem::take(&mut self.plain);
        plain.resize(READ_CHUNK, 0);
        let mut buf = std::mem::take(&mut self.buf);
        let mut source = CipherSource::new(src, key, size, plain);
        let result = self.send_packets(&plan, &name, &mut buf, &mut source, progress);
        let local_cksum = source.cksum.clone().finalize();
        self.plain = std::mem::take(&mut source.plain);
        self.buf = buf;
        result?;
        self.finish_upload(local_cksum)
    }

    fn send_packets(
        &mut self,
        plan: &PacketPlan,
        name: &NameField,
        buf: &mut Vec<u8>,
        source: &mut CipherSource<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ClientError> {
        let per_packet = plan.convention == ContentSizeField::PerPacketEncrypted;
        if !per_packet {
            source.start_segment(plan.orig_size);
        }
        let cap = REQUEST_HEADER_LEN
            + PACKET_HEADER_LEN
            + (plan.wire_bytes.min(plan.packet_size) as usize).min(STREAM_CHUNK);
        buf.clear();
        buf.reserve(cap);
        for spec in plan.packets() {
            if per_packet {
                source.start_segment(spec.chunk_plain_len);
            }
            buf.clear();
            self.push_packet_header(buf, plan, &spec, name);
            let mut rem = spec.content_len as usize;
            loop {
                let take = rem.min(STREAM_CHUNK);
                source.fill(buf, take)?;
                rem -= take;
                if rem == 0 {
                    break;
                }
                self.in_step = false;
                self.send_raw(buf)?;
                buf.clear();
            }
            self.in_step = false;
            self.send_raw(buf)?;
            progress(source.plain_read());
        }
        // Every plaintext byte must have been consumed (the plan guarantees it).
        if source.total_remaining != 0 || source.enc.is_some() || !source.carry.is_empty() {
            return Err(ClientError::local(
                io::ErrorKind::Other,
                "internal error: packet plan does not cover the file",
            ));
        }
        Ok(())
    }

    fn push_packet_header(&self, buf: &mut Vec<u8>, plan: &PacketPlan, spec: &PacketSpec, name: &NameField) {
        let header = RequestHeader {
            client_id: self.id,
            version: VERSION,
            code: Code::FilePacket.as_u16(),
            payload_size: (PACKET_HEADER_LEN as u64 + spec.content_len) as u32,
        };
        buf.extend_from_slice(&header.encode());
        PacketHeader {
            content_size: spec.content_size_field,
            orig_file_size: spec.orig_file_size_field,
            packet_number: spec.number,
            total_packets: plan.total_packets,
            file_name: name.clone(),
        }
        .encode(buf);
    }

    /// Read the 1603 that ends an upload (skipping one 1604 after an
    /// unacknowledged 1030).
    fn finish_upload(&mut self, local_cksum: u32) -> Result<Uploaded, ClientError> {
        self.in_step = false;
        loop {
            let resp = self.read_response()?;
            match resp {
                Response::Ack { .. } if self.tolerate_ack => self.tolerate_ack = false,
                Response::FileReceived { content_size, file_name, cksum, .. } => {
                    self.in_step = true;
                    self.tolerate_ack = false;
                    let up = Uploaded {
                        server_cksum: cksum,
                        local_cksum,
                        content_size,
                        file_name_field: file_name,
                    };
                    self.last_upload = Some(up.clone());
                    return Ok(up);
                }
                other => {
                    self.in_step = true;
                    self.tolerate_ack = false;
                    return Err(ClientError::Refused(other));
                }
            }
        }
    }

    /// [`upload`](Self::upload) from memory.
    pub fn upload_bytes(
        &mut self,
        file_name: &str,
        data: &[u8],
        opts: &UploadOptions,
    ) -> Result<Uploaded, ClientError> {
        let mut src = data;
        self.upload(file_name, &mut src, data.len() as u64, opts)
    }

    /// Send an already-encrypted whole-file ciphertext (benchmarks: encrypt
    /// once, send many times). Conventions 1 and 2 only. `local_cksum` is
    /// returned as is in [`Uploaded::local_cksum`].
    pub fn upload_ciphertext(
        &mut self,
        file_name: &str,
        ciphertext: &[u8],
        orig_size: u64,
        local_cksum: u32,
        opts: &UploadOptions,
    ) -> Result<Uploaded, ClientError> {
        let name = name_field(file_name)?;
        let plan = PacketPlan::for_ciphertext(
            ciphertext.len() as u64,
            orig_size,
            opts.packet_size,
            opts.content_size,
        )
        .map_err(|m| ClientError::local(io::ErrorKind::InvalidInput, m))?;
        let mut buf = std::mem::take(&mut self.buf);
        let mut result = Ok(());
        for spec in plan.packets() {
            buf.clear();
            self.push_packet_header(&mut buf, &plan, &spec, &name);
            let start = spec.offset as usize;
            buf.extend_from_slice(&ciphertext[start..start + spec.content_len as usize]);
            self.in_step = false;
            result = self.send_raw(&buf);
            if result.is_err() {
                break;
            }
        }
        self.buf = buf;
        result?;
        self.finish_upload(local_cksum)
    }

    /// 1029: the checksum matched; expects 1604.
    pub fn crc_ok(&mut self, file_name: &str) -> Result<(), ClientError> {
        ack_or_refused(self.name_request(Code::CrcOk, file_name)?)
    }

    /// 1030: the checksum did not match, the file follows again. Reads a 1604
    /// only if `expect_ack`; otherwise a 1604 arriving before the next 1603
    /// is skipped.
    pub fn crc_retry(&mut self, file_name: &str, expect_ack: bool) -> Result<(), ClientError> {
        if expect_ack {
            return ack_or_refused(self.name_request(Code::CrcRetry, file_name)?);
        }
        let field = name_field(file_name)?;
        self.send_frame(Code::CrcRetry, &[&field.0])?;
        self.tolerate_ack = true;
        Ok(())
    }

    /// 1031: give up on the file; expects 1604.
    pub fn crc_abort(&mut self, file_name: &str) -> Result<(), ClientError> {
        ack_or_refused(self.name_request(Code::CrcAbort, file_name)?)
    }

    /// The whole flow of one file: upload, compare checksums; on a mismatch
    /// send 1030 and upload again ([`MAX_ATTEMPTS`] attempts in all), then
    /// 1031. `progress` gets the plaintext bytes read so far in the current
    /// attempt.
    pub fn send_file(
        &mut self,
        file_name: &str,
        path: &Path,
        opts: &UploadOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<SendOutcome, ClientError> {
        let mut file = File::open(path)
            .map_err(|e| ClientError::local(e.kind(), format!("cannot open {}: {e}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| ClientError::local(e.kind(), format!("cannot stat {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(ClientError::local(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let size = meta.len();
        // Check the name and the plan before touching the connection.
        name_field(file_name)?;
        PacketPlan::new(size, opts.packet_size, opts.content_size)
            .map_err(|m| ClientError::local(io::ErrorKind::InvalidInput, m))?;
        for attempt in 1..=MAX_ATTEMPTS {
            if attempt > 1 {
                self.crc_retry(file_name, opts.ack_retry)?;
                file.seek(SeekFrom::Start(0)).map_err(ClientError::Local)?;
            }
            let up = self.upload_with_progress(file_name, &mut file, size, opts, progress)?;
            if up.cksum_matches() {
                self.crc_ok(file_name)?;
                return Ok(SendOutcome::Verified { cksum: up.local_cksum, attempts: attempt });
            }
        }
        self.crc_abort(file_name)?;
        Ok(SendOutcome::CksumMismatch { attempts: MAX_ATTEMPTS })
    }
}

fn ack_or_refused(resp: Response) -> Result<(), ClientError> {
    match resp {
        Response::Ack { .. } => Ok(()),
        other => Err(ClientError::Refused(other)),
    }
}

fn no_key() -> ClientError {
    ClientError::Crypto("no session key yet: send the public key (1026) or reconnect (1027) first".into())
}
