//! Property tests of the STOMP decoder on arbitrary input: it never
//! panics, never holds more than its limits allow, encode→decode is the
//! identity, and how a byte stream is split never changes what it decodes to.

use proptest::prelude::*;
use stompgate::stomp::frame::{encode, Decoder, Frame, Limits};

const LIMITS: Limits = Limits {
    max_frame_bytes: 4096,
    max_headers: 16,
    max_header_bytes: 512,
};

/// Decodes a stream fed in `pieces`; stops at the first error.
fn decode(pieces: &[&[u8]]) -> (Vec<Frame>, bool) {
    let mut decoder = Decoder::new(LIMITS);
    let mut frames = Vec::new();
    for piece in pieces {
        decoder.feed(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
            // What it keeps between frames never exceeds one frame's limit
            // plus the piece just fed.
            assert!(decoder.buffered() <= LIMITS.max_frame_bytes + piece.len());
        }
    }
    (frames, false)
}

fn command() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["SEND", "SUBSCRIBE", "MESSAGE", "ACK", "BEGIN"])
        .prop_map(String::from)
}

/// Header names and values with the characters that need escaping, and
/// any UTF-8 but NUL.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just(':'),
            Just('\n'),
            Just('\r'),
            Just('\\'),
            // Not NUL: STOMP cannot carry one in a header (the encoder
            // drops it, the decoder refuses it; tests/hostile.rs).
            any::<char>().prop_filter("no NUL", |c| *c != '\0'),
            prop::char::range('a', 'z'),
        ],
        0..24,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        command(),
        prop::collection::vec(
            (text().prop_filter("name", |n| !n.is_empty()), text()),
            0..6,
        ),
        prop::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(command, headers, body)| {
            let mut frame = Frame::new(command).body(body);
            frame.headers = headers;
            frame
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..8192)) {
        decode(&[&bytes]);
    }

    #[test]
    fn stomp_like_noise_never_panics(
        parts in prop::collection::vec(
            prop_oneof![
                Just(b"SEND\n".to_vec()),
                Just(b"content-length:".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b"\0".to_vec()),
                Just(b"\\".to_vec()),
                Just(b":".to_vec()),
                Just(b"18446744073709551615".to_vec()),
                prop::collection::vec(any::<u8>(), 0..64),
            ],
            0..64,
        )
    ) {
        let bytes: Vec<u8> = parts.concat();
        decode(&[&bytes]);
    }

    #[test]
    fn encode_then_decode_is_identity(frames in prop::collection::vec(frame(), 1..4)) {
        let bytes: Vec<u8> = frames.iter().flat_map(|f| encode(f, true)).collect();
        let (decoded, failed) = decode(&[&bytes]);
        prop_assert!(!failed);
        prop_assert_eq!(decoded.len(), frames.len());
        for (got, sent) in decoded.iter().zip(&frames) {
            prop_assert_eq!(&got.command, &sent.command);
            prop_assert_eq!(&got.body, &sent.body);
            // The encoder adds content-length for a body; the rest is as sent.
            let headers: Vec<_> = got
                .headers
                .iter()
                .filter(|(n, _)| {
                    n != "content-length" || sent.headers.iter().any(|(s, _)| s == n)
                })
                .cloned()
                .collect();
            prop_assert_eq!(&headers, &sent.headers);
        }
    }

    #[test]
    fn splitting_never_changes_the_result(
        frames in prop::collection::vec(frame(), 1..4),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let bytes: Vec<u8> = frames.iter().flat_map(|f| encode(f, true)).collect();
        let whole = decode(&[&bytes]);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for point in points {
            pieces.push(&bytes[start..point]);
            start = point;
        }
        pieces.push(&bytes[start..]);
        prop_assert_eq!(decode(&pieces), whole);
    }
}
