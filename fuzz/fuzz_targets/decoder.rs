//! The STOMP stream decoder on arbitrary bytes, fed in two pieces split at
//! the first byte's value: it must never panic nor hold more than its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stompgate::stomp::frame::{Decoder, Limits};

const LIMITS: Limits = Limits {
    max_frame_bytes: 4096,
    max_headers: 16,
    max_header_bytes: 512,
};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut decoder = Decoder::new(LIMITS);
    for piece in [&data[..split], &data[split..]] {
        decoder.feed(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
            assert!(decoder.buffered() <= LIMITS.max_frame_bytes + piece.len());
        }
    }
});
