//! The bodies of the fuzz targets, shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`, which include this folder with `#[path]`) and by
//! `tests/fuzz_regressions.rs`, which runs them over the committed corpus and
//! over random inputs from a fixed seed in every `cargo test`.
//!
//! Each target takes arbitrary bytes and panics on a broken invariant; a
//! target that returns has found nothing. Nothing here touches a socket, a
//! file or the clock.
//!
//! One module per target: `frame_decoder`, `payload_parsers`,
//! `packet_sequence`, `stream_decrypt`, `session` (a folder: the simulator,
//! its generator, the model checks and the fake worker) and `path_normalize`.

#![allow(dead_code)]

mod frame_decoder;
mod packet_sequence;
mod path_normalize;
mod payload_parsers;
mod session;
mod stream_decrypt;

// The public API of the harness. Each includer uses a part of it (a fuzz
// target one function), so a re-export unused by one of them is no warning.
#[allow(unused_imports)]
pub use self::frame_decoder::frame_decoder;
#[allow(unused_imports)]
pub use self::packet_sequence::{new_receiving, packet_sequence, packet_sequence_stats, SequenceStats};
#[allow(unused_imports)]
pub use self::path_normalize::{check_normalized_path, path_normalize};
#[allow(unused_imports)]
pub use self::payload_parsers::payload_parsers;
#[allow(unused_imports)]
pub use self::session::{client_key, session, session_stats, ClientKey, SessionStats};
#[allow(unused_imports)]
pub use self::stream_decrypt::stream_decrypt;

/// The server's default `--max-packet` (16 MiB).
pub const MAX_PACKET: u32 = 16 << 20;

/// A fuzz target: arbitrary bytes in, a panic on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and corpus folder.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_decoder", frame_decoder),
    ("payload_parsers", payload_parsers),
    ("packet_sequence", packet_sequence),
    ("stream_decrypt", stream_decrypt),
    ("session", session),
    ("path_normalize", path_normalize),
];

/// Reads fixed-size values from the fuzz input; zeros once it is used up.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let got = self.bytes(N);
        b[..got.len()].copy_from_slice(got);
        b
    }

    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
}
