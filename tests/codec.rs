//! The STOMP 1.2 codec on its own: stream decoding edge cases, escaping,
//! limits, and the encoder's exact bytes.

use stompgate::stomp::frame::{encode, Decoder, Frame, FrameError, FrameWriter, Limits};

fn decoder() -> Decoder {
    Decoder::new(Limits {
        max_frame_bytes: 4096,
        max_headers: 8,
        max_header_bytes: 256,
    })
}

fn decode_all(d: &mut Decoder) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(frame) = d.next_frame().expect("valid stream") {
        frames.push(frame);
    }
    frames
}

const TWO_FRAMES: &[u8] =
    b"SEND\ndestination:/topic/a\n\nfirst\0\nSEND\ndestination:/topic/b\ncontent-length:6\n\nsec\0nd\0";

#[test]
fn several_frames_in_one_message() {
    let mut d = decoder();
    d.feed(TWO_FRAMES);
    let frames = decode_all(&mut d);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].get("destination"), Some("/topic/a"));
    assert_eq!(frames[0].body.as_ref(), b"first");
    assert_eq!(frames[1].body.as_ref(), b"sec\0nd");
    assert_eq!(d.buffered(), 0);
}

#[test]
fn any_split_of_the_stream_decodes_the_same() {
    let mut whole = decoder();
    whole.feed(TWO_FRAMES);
    let expected = decode_all(&mut whole);
    for split in 0..=TWO_FRAMES.len() {
        let mut d = decoder();
        d.feed(&TWO_FRAMES[..split]);
        let mut frames = decode_all(&mut d);
        d.feed(&TWO_FRAMES[split..]);
        frames.extend(decode_all(&mut d));
        assert_eq!(frames, expected, "split at {split}");
    }
    // And one byte at a time.
    let mut d = decoder();
    let mut frames = Vec::new();
    for byte in TWO_FRAMES {
        d.feed(std::slice::from_ref(byte));
        frames.extend(decode_all(&mut d));
    }
    assert_eq!(frames, expected);
}

#[test]
fn heartbeats_alone_and_between_frames() {
    let mut d = decoder();
    d.feed(b"\n");
    assert_eq!(d.next_frame().unwrap(), None);
    d.feed(b"\r\n");
    assert_eq!(d.next_frame().unwrap(), None);
    d.feed(b"\r");
    assert_eq!(d.next_frame().unwrap(), None, "lone CR waits for its LF");
    d.feed(b"\n\nDISCONNECT\n\n\0\r\n\n\nDISCONNECT\n\n\0\n");
    let frames = decode_all(&mut d);
    assert_eq!(frames.len(), 2);
    assert!(frames.iter().all(|f| f.command == "DISCONNECT"));
    assert_eq!(d.buffered(), 0);
}

#[test]
fn crlf_line_endings() {
    let mut d = decoder();
    d.feed(b"SEND\r\ndestination:/topic/a\r\nx:y\r\n\r\nbody\0");
    let frame = d.next_frame().unwrap().unwrap();
    assert_eq!(frame.command, "SEND");
    assert_eq!(frame.get("destination"), Some("/topic/a"));
    assert_eq!(frame.get("x"), Some("y"));
    assert_eq!(frame.body.as_ref(), b"body");
}

#[test]
fn content_length_body_holds_nuls_and_must_end_with_nul() {
    let mut d = decoder();
    d.feed(b"SEND\ncontent-length:3\n\n\0\0\0\0");
    assert_eq!(d.next_frame().unwrap().unwrap().body.as_ref(), b"\0\0\0");
    let mut d = decoder();
    d.feed(b"SEND\ncontent-length:2\n\nabc\0");
    assert_eq!(d.next_frame(), Err(FrameError::MissingNul));
    let mut d = decoder();
    d.feed(b"SEND\ncontent-length:x\n\n\0");
    assert!(matches!(
        d.next_frame(),
        Err(FrameError::BadContentLength(_))
    ));
}

#[test]
fn header_escapes_decode() {
    let mut d = decoder();
    d.feed(b"SEND\na\\cb:1\\n2\\r3\\\\4\\c5\n\n\0");
    let frame = d.next_frame().unwrap().unwrap();
    assert_eq!(frame.get("a:b"), Some("1\n2\r3\\4:5"));
}

#[test]
fn undefined_escape_is_an_error() {
    for bad in [&b"SEND\nx:a\\tb\n\n\0"[..], b"SEND\nx:a\\\n\n\0"] {
        let mut d = decoder();
        d.feed(bad);
        assert!(matches!(d.next_frame(), Err(FrameError::BadEscape(_))));
    }
}

#[test]
fn connect_headers_are_not_unescaped() {
    let mut d = decoder();
    d.feed(b"CONNECT\npasscode:a\\tb\n\n\0");
    assert_eq!(
        d.next_frame().unwrap().unwrap().get("passcode"),
        Some("a\\tb")
    );
}

#[test]
fn stomp_1_0_has_no_escaping() {
    let mut d = decoder();
    d.set_escapes(false);
    d.feed(b"SEND\nx:a\\tb\n\n\0");
    assert_eq!(d.next_frame().unwrap().unwrap().get("x"), Some("a\\tb"));
}

#[test]
fn repeated_headers_first_wins() {
    let mut d = decoder();
    d.feed(b"SEND\nfoo:first\nfoo:second\n\n\0");
    let frame = d.next_frame().unwrap().unwrap();
    assert_eq!(frame.get("foo"), Some("first"));
    assert_eq!(frame.headers.len(), 2);
}

#[test]
fn header_without_colon_and_invalid_utf8_are_errors() {
    let mut d = decoder();
    d.feed(b"SEND\nnocolon\n\n\0");
    assert!(matches!(d.next_frame(), Err(FrameError::MissingColon(_))));
    let mut d = decoder();
    d.feed(b"SEND\nx:\xff\xfe\n\n\0");
    assert_eq!(d.next_frame(), Err(FrameError::NotUtf8));
}

#[test]
fn frame_size_limit_applies_before_the_frame_ends() {
    let mut d = decoder();
    d.feed(b"SEND\n\n");
    d.feed(&[b'a'; 4096]);
    assert_eq!(d.next_frame(), Err(FrameError::TooLarge { limit: 4096 }));
    // Complete, NUL and all, in one piece: still too large.
    let mut d = decoder();
    d.feed(b"SEND\n\n");
    d.feed(&[b'a'; 4096]);
    d.feed(b"\0");
    assert_eq!(d.next_frame(), Err(FrameError::TooLarge { limit: 4096 }));
    // Exactly at the limit is fine.
    let mut d = decoder();
    d.feed(b"SEND\n\n");
    d.feed(&[b'a'; 4096 - 7]);
    d.feed(b"\0");
    assert_eq!(d.next_frame().unwrap().unwrap().body.len(), 4096 - 7);
    // A declared length over the limit fails at once, without waiting,
    // however large it is.
    for length in ["100000", "18446744073709551615"] {
        let mut d = decoder();
        d.feed(format!("SEND\ncontent-length:{length}\n\n").as_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { limit: 4096 }));
    }
}

#[test]
fn header_count_and_length_limits() {
    let mut d = decoder();
    let mut frame = b"SEND\n".to_vec();
    for i in 0..9 {
        frame.extend_from_slice(format!("h{i}:v\n").as_bytes());
    }
    frame.extend_from_slice(b"\n\0");
    d.feed(&frame);
    assert_eq!(d.next_frame(), Err(FrameError::TooManyHeaders { limit: 8 }));

    let mut d = decoder();
    d.feed(format!("SEND\nx:{}\n\n\0", "v".repeat(300)).as_bytes());
    assert_eq!(
        d.next_frame(),
        Err(FrameError::HeaderTooLong { limit: 256 })
    );
    // An over-long line is refused before its end arrives.
    let mut d = decoder();
    d.feed(format!("SEND\nx:{}", "v".repeat(300)).as_bytes());
    assert_eq!(
        d.next_frame(),
        Err(FrameError::HeaderTooLong { limit: 256 })
    );
}

#[test]
fn encoder_golden_bytes() {
    let frame = Frame::new("MESSAGE")
        .header("destination", "/topic/no01")
        .header("x:y", "a\nb\\c\rd")
        .body(&b"hi"[..]);
    assert_eq!(
        encode(&frame, true),
        b"MESSAGE\ndestination:/topic/no01\nx\\cy:a\\nb\\\\c\\rd\ncontent-length:2\n\nhi\0"
    );
    // Without escaping (STOMP 1.0) line breaks are dropped so a value can
    // never inject a header.
    let frame = Frame::new("MESSAGE").header("x", "a\nevil:1");
    assert_eq!(encode(&frame, false), b"MESSAGE\nx:aevil:1\n\n\0");
    // CONNECTED is never escaped.
    let frame = Frame::new("CONNECTED").header("server", "a:b");
    assert_eq!(encode(&frame, true), b"CONNECTED\nserver:a:b\n\n\0");
}

#[test]
fn frame_writer_golden_bytes() {
    // The delivery path: a value joined from parts, each escaped.
    let mut w = FrameWriter::new("MESSAGE", true, 0);
    w.header("subscription", "s:1");
    w.header_number("message-id", 18_446_744_073_709_551_615);
    w.header_parts("destination", &["/topic/", "a:b\n"]);
    assert_eq!(
        w.finish(b"body"),
        b"MESSAGE\nsubscription:s\\c1\nmessage-id:18446744073709551615\n\
          destination:/topic/a\\cb\\n\ncontent-length:4\n\nbody\0"
    );
    // A content-length already there is not repeated; an empty body gets none.
    let mut w = FrameWriter::new("MESSAGE", true, 0);
    w.header("content-length", "2");
    assert_eq!(w.finish(b"hi"), b"MESSAGE\ncontent-length:2\n\nhi\0");
    let mut w = FrameWriter::new("MESSAGE", false, 0);
    w.header_parts("x", &["a\r\n", "evil:1"]);
    assert_eq!(w.finish(b""), b"MESSAGE\nx:aevil:1\n\n\0");
}

#[test]
fn encode_then_decode_is_identity() {
    let frame = Frame::new("SEND")
        .header("destination", "/topic/한겨레")
        .header("weird:name", "line\nbreak\\slash\rcr")
        .body(&b"\0binary\0"[..]);
    let mut d = decoder();
    d.feed(&encode(&frame, true));
    let decoded = d.next_frame().unwrap().unwrap();
    assert_eq!(decoded.get("weird:name"), frame.get("weird:name"));
    assert_eq!(decoded.get("destination"), frame.get("destination"));
    assert_eq!(decoded.body, frame.body);
}
