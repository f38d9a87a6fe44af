//! How a file's ciphertext is cut into packets ([`PacketPlan`], pure, for the
//! three conventions of clients in the field) and how it is produced from the
//! plaintext as the packets are sent (`CipherSource`: read, encrypt and
//! checksum in one pass).

use std::io::{self, Read};

use super::{ClientError, ContentSizeField};
use crate::crypto::{self, Cksum, StreamEncryptor, AES_KEY_LEN};
use crate::protocol::PACKET_HEADER_LEN;

/// How an upload is cut into packets. Pure arithmetic, no I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketPlan {
    pub convention: ContentSizeField,
    /// Content bytes per packet (plaintext chunk size for convention 3).
    pub packet_size: u64,
    /// Plaintext size of the whole file.
    pub orig_size: u64,
    /// Total content bytes over all packets (the whole ciphertext for
    /// conventions 1 and 2, the sum of the chunk ciphertexts for 3).
    pub wire_bytes: u64,
    pub total_packets: u16,
}

/// One packet of a [`PacketPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketSpec {
    /// 1-based packet number.
    pub number: u16,
    /// Offset of this packet's content in the concatenation of all contents.
    pub offset: u64,
    /// Content bytes of this packet.
    pub content_len: u64,
    /// Value of the `content_size` field.
    pub content_size_field: u32,
    /// Value of the `orig_file_size` field.
    pub orig_file_size_field: u32,
    /// Convention 3: plaintext bytes encrypted into this packet; otherwise 0.
    pub chunk_plain_len: u64,
}

impl PacketPlan {
    /// Plan the upload of `orig_size` plaintext bytes.
    pub fn new(
        orig_size: u64,
        packet_size: usize,
        convention: ContentSizeField,
    ) -> Result<PacketPlan, String> {
        if convention != ContentSizeField::PerPacketEncrypted {
            // Conventions 1 and 2 cut the whole-file ciphertext.
            let ct = crypto::ciphertext_len(orig_size);
            return Self::for_ciphertext(ct, orig_size, packet_size, convention);
        }
        let p = packet_size as u64;
        if p == 0 {
            return Err("packet size must be at least 1 byte".into());
        }
        let full = orig_size / p;
        let chunk_ct = crypto::ciphertext_len(p);
        let wire = full.saturating_mul(chunk_ct).saturating_add(crypto::ciphertext_len(orig_size % p));
        let max_content = if full > 0 { chunk_ct } else { crypto::ciphertext_len(orig_size) };
        Self::checked(convention, p, orig_size, wire, full + 1, max_content)
    }

    /// Plan the upload of an already encrypted whole-file ciphertext of
    /// `ct_len` bytes (conventions 1 and 2 only).
    pub fn for_ciphertext(
        ct_len: u64,
        orig_size: u64,
        packet_size: usize,
        convention: ContentSizeField,
    ) -> Result<PacketPlan, String> {
        let p = packet_size as u64;
        if p == 0 {
            return Err("packet size must be at least 1 byte".into());
        }
        if ct_len == 0 {
            return Err("ciphertext is empty".into());
        }
        let total = match convention {
            ContentSizeField::ThisPacket => ct_len.div_ceil(p),
            ContentSizeField::WholeFile => ct_len / p + 1,
            ContentSizeField::PerPacketEncrypted => {
                return Err("per-packet encryption needs the plaintext, not a whole-file ciphertext".into())
            }
        };
        Self::checked(convention, p, orig_size, ct_len, total, ct_len.min(p))
    }

    fn checked(
        convention: ContentSizeField,
        packet_size: u64,
        orig_size: u64,
        wire_bytes: u64,
        total: u64,
        max_content: u64,
    ) -> Result<PacketPlan, String> {
        if orig_size > u64::from(u32::MAX) || wire_bytes > u64::from(u32::MAX) {
            return Err(format!(
                "a file of {orig_size} bytes is too large for protocol v3 (sizes are 32-bit: at most 4 GiB of ciphertext)"
            ));
        }
        if max_content + PACKET_HEADER_LEN as u64 > u64::from(u32::MAX) {
            return Err(format!("packet of {max_content} bytes does not fit a 32-bit frame size"));
        }
        let total_packets = u16::try_from(total).map_err(|_| {
            format!(
                "{total} packets of {packet_size} bytes would be needed, more than the protocol's 65535; \
                 use a larger packet size"
            )
        })?;
        Ok(PacketPlan { convention, packet_size, orig_size, wire_bytes, total_packets })
    }

    /// The packet numbered `number` (1..=total_packets).
    pub fn packet(&self, number: u16) -> PacketSpec {
        debug_assert!(number >= 1 && number <= self.total_packets);
        let i = u64::from(number - 1);
        let p = self.packet_size;
        match self.convention {
            ContentSizeField::ThisPacket | ContentSizeField::WholeFile => {
                let offset = (i * p).min(self.wire_bytes);
                let content_len = p.min(self.wire_bytes - offset);
                let content_size_field = if self.convention == ContentSizeField::ThisPacket {
                    content_len as u32
                } else {
                    self.wire_bytes as u32
                };
                PacketSpec {
                    number,
                    offset,
                    content_len,
                    content_size_field,
                    orig_file_size_field: self.orig_size as u32,
                    chunk_plain_len: 0,
                }
            }
            ContentSizeField::PerPacketEncrypted => {
                let full = self.orig_size / p;
                let chunk_plain_len = if i < full { p } else { self.orig_size % p };
                let content_len = crypto::ciphertext_len(chunk_plain_len);
                PacketSpec {
                    number,
                    offset: i * crypto::ciphertext_len(p),
                    content_len,
                    content_size_field: content_len as u32,
                    orig_file_size_field: chunk_plain_len as u32,
                    chunk_plain_len,
                }
            }
        }
    }

    /// All packets in order.
    pub fn packets(&self) -> impl Iterator<Item = PacketSpec> + '_ {
        (1..=self.total_packets).map(|n| self.packet(n))
    }
}

// ---------------------------------------------------------------------------
// Streaming encryption of a source
// ---------------------------------------------------------------------------

/// Reads plaintext from a source, checksums and encrypts it, and hands out
/// exactly as many ciphertext bytes as asked. A "segment" is one run of
/// plaintext encrypted with its own IV and padding: the whole file for
/// conventions 1 and 2, one chunk for convention 3.
pub(super) struct CipherSource<'a> {
    pub(super) src: &'a mut dyn Read,
    pub(super) key: [u8; AES_KEY_LEN],
    pub(super) enc: Option<StreamEncryptor>,
    /// Plaintext bytes of the current segment not yet read.
    pub(super) seg_remaining: u64,
    /// Plaintext bytes of the whole source not yet read.
    pub(super) total_remaining: u64,
    pub(super) expected: u64,
    pub(super) plain: Vec<u8>,
    /// Ciphertext produced beyond what the last `fill` asked for (< 32 bytes).
    pub(super) carry: Vec<u8>,
    pub(super) cksum: Cksum,
}

impl<'a> CipherSource<'a> {
    pub(super) fn new(src: &'a mut dyn Read, key: [u8; AES_KEY_LEN], size: u64, plain: Vec<u8>) -> Self {
        CipherSource {
            src,
            key,
            enc: None,
            seg_remaining: 0,
            total_remaining: size,
            expected: size,
            plain,
            carry: Vec::with_capacity(2 * crypto::BLOCK),
            cksum: Cksum::new(),
        }
    }

    pub(super) fn start_segment(&mut self, plain_len: u64) {
        debug_assert!(self.enc.is_none() && self.carry.is_empty() && self.seg_remaining == 0);
        self.enc = Some(StreamEncryptor::new(&self.key));
        self.seg_remaining = plain_len;
    }

    pub(super) fn plain_read(&self) -> u64 {
        self.expected - self.total_remaining
    }

    /// Append exactly `n` ciphertext bytes to `out`.
    pub(super) fn fill(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), ClientError> {
        let target = out.len() + n;
        let take = n.min(self.carry.len());
        out.extend_from_slice(&self.carry[..take]);
        self.carry.drain(..take);
        while out.len() < target {
            let need = target - out.len();
            if self.enc.is_none() {
                return Err(ClientError::local(
                    io::ErrorKind::Other,
                    "internal error: packet plan exceeds ciphertext",
                ));
            }
            if self.seg_remaining > 0 {
                // Read only about what is needed, so the overshoot stays below two blocks.
                let r = (self.seg_remaining.min(self.plain.len() as u64) as usize).min(need + crypto::BLOCK);
                self.read_plain(r)?;
                self.cksum.update(&self.plain[..r]);
                self.seg_remaining -= r as u64;
                self.total_remaining -= r as u64;
                if let Some(enc) = self.enc.as_mut() {
                    enc.update(&self.plain[..r], out);
                }
            } else {
                if self.total_remaining == 0 {
                    self.probe_eof()?;
                }
                if let Some(enc) = self.enc.take() {
                    enc.finish(out);
                }
            }
        }
        if out.len() > target {
            self.carry.extend_from_slice(&out[target..]);
            out.truncate(target);
        }
        Ok(())
    }

    /// Fill `self.plain[..r]` from the source; a short source is a changed file.
    pub(super) fn read_plain(&mut self, r: usize) -> Result<(), ClientError> {
        let mut got = 0;
        while got < r {
            match self.src.read(&mut self.plain[got..r]) {
                Ok(0) => {
                    return Err(ClientError::FileChanged {
                        expected: self.expected,
                        read: self.plain_read() + got as u64,
                    })
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Local(e)),
            }
        }
        Ok(())
    }

    /// After the announced size: the source must be at its end.
    pub(super) fn probe_eof(&mut self) -> Result<(), ClientError> {
        let mut b = [0u8; 1];
        loop {
            match self.src.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(ClientError::FileChanged { expected: self.expected, read: self.expected + 1 })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Local(e)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::crypto::{ciphertext_len, encrypt_all, StreamDecryptor};

    const MIB: usize = 1024 * 1024;

    fn lens(plan: &PacketPlan) -> Vec<u64> {
        plan.packets().map(|p| p.content_len).collect()
    }

    /// Invariants every plan must satisfy.
    pub(in crate::client) fn check_plan(plan: &PacketPlan) {
        let mut offset = 0;
        let mut plain = 0;
        for (i, p) in plan.packets().enumerate() {
            assert_eq!(p.number as usize, i + 1);
            assert_eq!(p.offset, offset, "contiguous contents");
            offset += p.content_len;
            assert!(p.content_len + PACKET_HEADER_LEN as u64 <= u64::from(u32::MAX));
            match plan.convention {
                ContentSizeField::ThisPacket => {
                    assert!(p.content_len > 0 && p.content_len <= plan.packet_size);
                    assert_eq!(u64::from(p.content_size_field), p.content_len);
                    assert_eq!(u64::from(p.orig_file_size_field), plan.orig_size);
                }
                ContentSizeField::WholeFile => {
                    assert!(p.content_len <= plan.packet_size);
                    assert_eq!(u64::from(p.content_size_field), plan.wire_bytes);
                    assert_eq!(u64::from(p.orig_file_size_field), plan.orig_size);
                    if p.number < plan.total_packets {
                        assert_eq!(p.content_len, plan.packet_size);
                    }
                }
                ContentSizeField::PerPacketEncrypted => {
                    assert_eq!(p.content_len, ciphertext_len(p.chunk_plain_len));
                    assert_eq!(u64::from(p.orig_file_size_field), p.chunk_plain_len);
                    assert!(p.chunk_plain_len <= plan.packet_size);
                    plain += p.chunk_plain_len;
                }
            }
        }
        assert_eq!(offset, plan.wire_bytes, "contents add up to the wire bytes");
        if plan.convention == ContentSizeField::PerPacketEncrypted {
            assert_eq!(plain, plan.orig_size);
        } else {
            assert_eq!(plan.wire_bytes, ciphertext_len(plan.orig_size));
        }
    }

    #[test]
    fn convention_1_splits() {
        let p = PacketPlan::new(0, MIB, ContentSizeField::ThisPacket).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (1, vec![16]));
        let p = PacketPlan::new(MIB as u64, MIB, ContentSizeField::ThisPacket).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (2, vec![MIB as u64, 16]));
        let p = PacketPlan::new(MIB as u64 - 1, MIB, ContentSizeField::ThisPacket).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (1, vec![MIB as u64]));
        let p = PacketPlan::new(100, 1000, ContentSizeField::ThisPacket).unwrap();
        assert_eq!(lens(&p), vec![112]);
        // Boundaries need not fall on blocks.
        let p = PacketPlan::new(100, 50, ContentSizeField::ThisPacket).unwrap();
        assert_eq!(lens(&p), vec![50, 50, 12]);
        assert_eq!(p.packet(2).offset, 50);
        assert_eq!(p.packet(3).content_size_field, 12);
        assert_eq!(p.packet(3).orig_file_size_field, 100);
        check_plan(&p);
    }

    #[test]
    fn convention_2_splits() {
        // 2032 bytes of plaintext -> 2048 of ciphertext, a multiple of 1024: empty last packet.
        let p = PacketPlan::new(2032, 1024, ContentSizeField::WholeFile).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (3, vec![1024, 1024, 0]));
        assert!(p.packets().all(|s| s.content_size_field == 2048 && s.orig_file_size_field == 2032));
        let p = PacketPlan::new(2048, 1024, ContentSizeField::WholeFile).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (3, vec![1024, 1024, 16]));
        let p = PacketPlan::new(0, 1024, ContentSizeField::WholeFile).unwrap();
        assert_eq!(lens(&p), vec![16]);
        let p = PacketPlan::new(0, 16, ContentSizeField::WholeFile).unwrap();
        assert_eq!(lens(&p), vec![16, 0]);
        check_plan(&p);
    }

    #[test]
    fn convention_3_splits() {
        let p = PacketPlan::new(8000, 4000, ContentSizeField::PerPacketEncrypted).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (3, vec![4016, 4016, 16]));
        let orig: Vec<u32> = p.packets().map(|s| s.orig_file_size_field).collect();
        assert_eq!(orig, vec![4000, 4000, 0]);
        let p = PacketPlan::new(8001, 4000, ContentSizeField::PerPacketEncrypted).unwrap();
        assert_eq!(lens(&p), vec![4016, 4016, 16]);
        assert_eq!(p.packet(3).orig_file_size_field, 1);
        let p = PacketPlan::new(0, 4000, ContentSizeField::PerPacketEncrypted).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (1, vec![16]));
        let p = PacketPlan::new(3999, 4000, ContentSizeField::PerPacketEncrypted).unwrap();
        assert_eq!(lens(&p), vec![4000]);
        assert_eq!(p.wire_bytes, 4000);
        check_plan(&p);
    }

    #[test]
    fn refusals() {
        assert!(PacketPlan::new(10, 0, ContentSizeField::ThisPacket).is_err());
        // 65535 packets are fine, 65536 are not.
        assert_eq!(
            PacketPlan::new(65535 * 16 - 16, 16, ContentSizeField::ThisPacket).unwrap().total_packets,
            65535
        );
        let e = PacketPlan::new(65535 * 16, 16, ContentSizeField::ThisPacket).unwrap_err();
        assert!(e.contains("65535"), "{e}");
        assert!(PacketPlan::new(65535 * 16 - 32, 16, ContentSizeField::WholeFile).is_ok());
        assert!(PacketPlan::new(65535 * 16 - 16, 16, ContentSizeField::WholeFile).is_err());
        assert!(PacketPlan::new(1 << 32, usize::MAX, ContentSizeField::ThisPacket).is_err());
        assert!(
            PacketPlan::new(u64::from(u32::MAX) - 16, usize::MAX >> 1, ContentSizeField::ThisPacket).is_err()
        );
        assert!(PacketPlan::for_ciphertext(32, 16, 10, ContentSizeField::PerPacketEncrypted).is_err());
        assert!(PacketPlan::for_ciphertext(0, 0, 10, ContentSizeField::ThisPacket).is_err());
        let p = PacketPlan::for_ciphertext(48, 40, 20, ContentSizeField::ThisPacket).unwrap();
        assert_eq!(lens(&p), vec![20, 20, 8]);
    }

    /// Drive `CipherSource` along a plan, as `send_packets` does, and return the contents.
    fn contents(data: &[u8], key: &[u8; 32], plan: &PacketPlan) -> Result<(Vec<Vec<u8>>, u32), ClientError> {
        let mut src = data;
        let mut source = CipherSource::new(&mut src, *key, plan.orig_size, vec![0; 4096]);
        if plan.convention != ContentSizeField::PerPacketEncrypted {
            source.start_segment(plan.orig_size);
        }
        let mut out = Vec::new();
        for spec in plan.packets() {
            if plan.convention == ContentSizeField::PerPacketEncrypted {
                source.start_segment(spec.chunk_plain_len);
            }
            let mut buf = Vec::new();
            // Fill in uneven pieces, like big packets are.
            let mut rem = spec.content_len as usize;
            while rem > 0 {
                let take = rem.min(37);
                source.fill(&mut buf, take)?;
                rem -= take;
            }
            assert_eq!(buf.len() as u64, spec.content_len);
            out.push(buf);
        }
        assert!(source.enc.is_none() && source.carry.is_empty() && source.total_remaining == 0);
        Ok((out, source.cksum.finalize()))
    }

    pub(in crate::client) fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(9) as u8).collect()
    }

    #[test]
    fn streaming_matches_whole_file_encryption() {
        let key = [7u8; 32];
        for len in [0, 1, 15, 16, 17, 100, 1000, 4096, 10_000] {
            let data = sample(len);
            let ct = encrypt_all(&key, &data);
            for p in [1, 7, 16, 100, 1024, 100_000] {
                for conv in [ContentSizeField::ThisPacket, ContentSizeField::WholeFile] {
                    let Ok(plan) = PacketPlan::new(len as u64, p, conv) else { continue };
                    let (parts, ck) = contents(&data, &key, &plan).unwrap();
                    assert_eq!(parts.concat(), ct, "len {len} p {p} {conv:?}");
                    assert_eq!(ck, crypto::cksum(&data));
                }
                let plan = PacketPlan::new(len as u64, p, ContentSizeField::PerPacketEncrypted).unwrap();
                let (parts, ck) = contents(&data, &key, &plan).unwrap();
                assert_eq!(ck, crypto::cksum(&data));
                let chunks: Vec<&[u8]> = if data.is_empty() { vec![] } else { data.chunks(p).collect() };
                for (i, part) in parts.iter().enumerate() {
                    let chunk = chunks.get(i).copied().unwrap_or(&[]);
                    assert_eq!(part, &encrypt_all(&key, chunk), "len {len} p {p} chunk {i}");
                }
            }
        }
    }

    #[test]
    fn size_changes_are_detected() {
        let key = [1u8; 32];
        let data = sample(1000);
        let plan = PacketPlan::new(1001, 256, ContentSizeField::ThisPacket).unwrap();
        match contents(&data, &key, &plan) {
            Err(ClientError::FileChanged { expected: 1001, read: 1000 }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        let plan = PacketPlan::new(999, 256, ContentSizeField::ThisPacket).unwrap();
        match contents(&data, &key, &plan) {
            Err(ClientError::FileChanged { expected: 999, read: 1000 }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        let plan = PacketPlan::new(999, 333, ContentSizeField::PerPacketEncrypted).unwrap();
        assert!(matches!(contents(&data, &key, &plan), Err(ClientError::FileChanged { .. })));
    }

    #[test]
    fn decrypts_back() {
        let key = [9u8; 32];
        let data = sample(5000);
        let plan = PacketPlan::new(5000, 333, ContentSizeField::ThisPacket).unwrap();
        let (parts, _) = contents(&data, &key, &plan).unwrap();
        let mut dec = StreamDecryptor::new(&key);
        let mut back = Vec::new();
        for mut part in parts {
            dec.update(&mut part, |b| back.extend_from_slice(b));
        }
        dec.finish(|b| back.extend_from_slice(b)).unwrap();
        assert_eq!(back, data);
    }
}
