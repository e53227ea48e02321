//! STOMP frames on the wire: a stream [`Decoder`] for client bytes (frames
//! may be split across or packed into WebSocket messages) and [`encode`] for
//! server frames.
//!
//! Follows STOMP 1.2: EOL is `\n` or `\r\n`, EOLs between frames are
//! heart-beats, `content-length` bodies may hold NULs, header names and
//! values are escaped (`\\`, `\n`, `\r`, `\c`) except in CONNECT, STOMP and
//! CONNECTED frames, and the first of repeated headers wins.

use bytes::{Buf, Bytes, BytesMut};

/// One STOMP frame. Header order is kept because STOMP says the first of
/// repeated headers wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Frame {
    pub fn new(command: impl Into<String>) -> Frame {
        Frame {
            command: command.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Frame {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Frame {
        self.body = body.into();
        self
    }

    /// The first value of header `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Bytes this frame takes on the wire, near enough for limits.
    pub fn wire_len(&self) -> usize {
        self.command.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>()
            + self.body.len()
            + 2
    }
}

/// Where the decoder gives up; the values come from `[stomp]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame larger than stomp.max_frame_bytes ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("more headers than stomp.max_headers ({limit})")]
    TooManyHeaders { limit: usize },
    #[error("header line longer than stomp.max_header_bytes ({limit} bytes)")]
    HeaderTooLong { limit: usize },
    #[error("header line without a colon: {0:?}")]
    MissingColon(String),
    #[error("undefined escape sequence {0:?} in a header")]
    BadEscape(String),
    #[error("frame command or header is not valid UTF-8")]
    NotUtf8,
    #[error("invalid content-length {0:?}")]
    BadContentLength(String),
    #[error("frame body of content-length bytes is not followed by NUL")]
    MissingNul,
    #[error("carriage return not followed by line feed")]
    BadEol,
    /// A NUL ends a frame: passed on inside a header, it would end the
    /// MESSAGE a subscriber reads there, and what follows would read as a
    /// frame of the sender's making.
    #[error("NUL byte in a header")]
    NulInHeader,
}

impl FrameError {
    /// A short, stable reason for the ERROR frame's `message` header.
    pub fn summary(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame too large",
            FrameError::TooManyHeaders { .. } => "too many headers",
            FrameError::HeaderTooLong { .. } => "header too long",
            FrameError::BadEscape(_) => "undefined escape sequence",
            _ => "malformed frame",
        }
    }
}

/// Parsed command and headers of a frame whose body is still arriving.
#[derive(Debug)]
struct Head {
    command: String,
    headers: Vec<(String, String)>,
    body_start: usize,
    content_length: Option<usize>,
    /// Bytes of the body already searched for the NUL: resumes the search
    /// where it stopped, so a large frame fed byte by byte stays linear.
    scanned: usize,
}

/// Incremental decoder: [`Decoder::feed`] bytes as they arrive, then call
/// [`Decoder::next_frame`] until it returns `Ok(None)`.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    limits: Limits,
    escapes: bool,
    head: Option<Head>,
    /// How far the buffer was searched for the blank line that ends a
    /// head, and where its last line began: a head that trickles in is
    /// searched once, not again from its start at every arrival.
    head_scan: HeadScan,
}

#[derive(Debug, Default)]
struct HeadScan {
    searched: usize,
    line_start: usize,
    lines: usize,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            limits,
            escapes: true,
            head: None,
            head_scan: HeadScan::default(),
        }
    }

    /// STOMP 1.0 has no header escaping; 1.1 and 1.2 have.
    pub fn set_escapes(&mut self, escapes: bool) {
        self.escapes = escapes;
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Drops what was received and not decoded: the connection is ending.
    pub fn discard(&mut self) {
        self.buf = BytesMut::new();
        self.head = None;
        self.head_scan = HeadScan::default();
    }

    /// Bytes received but not yet decoded into a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    /// Heart-beat EOLs are consumed silently.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.head.is_none() {
            // Heart-beat EOLs come before a frame's first line only.
            if self.head_scan.lines == 0 {
                let before = self.buf.len();
                self.skip_heartbeats()?;
                if self.buf.len() != before {
                    self.head_scan = HeadScan::default();
                }
            }
            if !self.head_complete()? {
                return Ok(None);
            }
            self.head_scan = HeadScan::default();
            match self.parse_head()? {
                Some(head) => self.head = Some(head),
                None => return Ok(None),
            }
        }
        let Some(head) = self.head.as_mut() else {
            return Ok(None);
        };
        let max = self.limits.max_frame_bytes;
        let body_end = match head.content_length {
            Some(len) => {
                // Compared before adding: a huge declared length must not
                // overflow the arithmetic.
                if len >= max || head.body_start + len + 1 > max {
                    return Err(FrameError::TooLarge { limit: max });
                }
                let end = head.body_start + len;
                if self.buf.len() <= end {
                    return Ok(None);
                }
                if self.buf[end] != 0 {
                    return Err(FrameError::MissingNul);
                }
                end
            }
            None => {
                let from = head.body_start + head.scanned;
                match self.buf[from..].iter().position(|&b| b == 0) {
                    Some(offset) if from + offset < max => from + offset,
                    Some(_) => return Err(FrameError::TooLarge { limit: max }),
                    None => {
                        head.scanned = self.buf.len() - head.body_start;
                        if self.buf.len() > max {
                            return Err(FrameError::TooLarge { limit: max });
                        }
                        return Ok(None);
                    }
                }
            }
        };
        let Some(head) = self.head.take() else {
            return Ok(None);
        };
        let mut raw = self.buf.split_to(body_end + 1);
        raw.truncate(body_end);
        let body = raw.split_off(head.body_start).freeze();
        Ok(Some(Frame {
            command: head.command,
            headers: head.headers,
            body,
        }))
    }

    fn skip_heartbeats(&mut self) -> Result<(), FrameError> {
        loop {
            match self.buf.first() {
                Some(b'\n') => self.buf.advance(1),
                Some(b'\r') => match self.buf.get(1) {
                    Some(b'\n') => self.buf.advance(2),
                    Some(_) => return Err(FrameError::BadEol),
                    None => return Ok(()),
                },
                _ => return Ok(()),
            }
        }
    }

    /// Whether the blank line that ends the head has arrived, searching
    /// only what came since the last call. Enforces the line, header count
    /// and frame limits on the way, so a head never grows past them.
    fn head_complete(&mut self) -> Result<bool, FrameError> {
        let limits = self.limits;
        let scan = &mut self.head_scan;
        while let Some(offset) = self.buf[scan.searched..].iter().position(|&b| b == b'\n') {
            let nl = scan.searched + offset;
            let mut line = &self.buf[scan.line_start..nl];
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            if line.len() > limits.max_header_bytes {
                return Err(FrameError::HeaderTooLong {
                    limit: limits.max_header_bytes,
                });
            }
            if nl >= limits.max_frame_bytes {
                return Err(FrameError::TooLarge {
                    limit: limits.max_frame_bytes,
                });
            }
            // The command line is never empty: heart-beats were skipped.
            if line.is_empty() {
                return Ok(true);
            }
            scan.lines += 1;
            // The command and max_headers headers; parse_head says which.
            if scan.lines > limits.max_headers + 1 {
                return Err(FrameError::TooManyHeaders {
                    limit: limits.max_headers,
                });
            }
            scan.line_start = nl + 1;
            scan.searched = nl + 1;
        }
        scan.searched = self.buf.len();
        if self.buf.len() - scan.line_start > limits.max_header_bytes {
            return Err(FrameError::HeaderTooLong {
                limit: limits.max_header_bytes,
            });
        }
        if self.buf.len() > limits.max_frame_bytes {
            return Err(FrameError::TooLarge {
                limit: limits.max_frame_bytes,
            });
        }
        Ok(false)
    }

    /// Parses command and headers once the blank line has arrived.
    fn parse_head(&self) -> Result<Option<Head>, FrameError> {
        let limits = self.limits;
        let mut pos = 0;
        let mut command: Option<String> = None;
        let mut headers = Vec::new();
        loop {
            let Some(nl) = self.buf[pos..].iter().position(|&b| b == b'\n') else {
                if self.buf.len() - pos > limits.max_header_bytes {
                    return Err(FrameError::HeaderTooLong {
                        limit: limits.max_header_bytes,
                    });
                }
                if self.buf.len() > limits.max_frame_bytes {
                    return Err(FrameError::TooLarge {
                        limit: limits.max_frame_bytes,
                    });
                }
                return Ok(None);
            };
            let mut line = &self.buf[pos..pos + nl];
            pos += nl + 1;
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            if line.len() > limits.max_header_bytes {
                return Err(FrameError::HeaderTooLong {
                    limit: limits.max_header_bytes,
                });
            }
            if pos > limits.max_frame_bytes {
                return Err(FrameError::TooLarge {
                    limit: limits.max_frame_bytes,
                });
            }
            let Some(cmd) = &command else {
                let cmd = std::str::from_utf8(line).map_err(|_| FrameError::NotUtf8)?;
                command = Some(cmd.to_owned());
                continue;
            };
            if line.is_empty() {
                let content_length = headers
                    .iter()
                    .find(|(n, _): &&(String, String)| n == "content-length")
                    .map(|(_, v)| {
                        v.trim()
                            .parse::<usize>()
                            .map_err(|_| FrameError::BadContentLength(v.clone()))
                    })
                    .transpose()?;
                return Ok(Some(Head {
                    command: command.unwrap_or_default(),
                    headers,
                    body_start: pos,
                    content_length,
                    scanned: 0,
                }));
            }
            if headers.len() == limits.max_headers {
                return Err(FrameError::TooManyHeaders {
                    limit: limits.max_headers,
                });
            }
            if line.contains(&0) {
                return Err(FrameError::NulInHeader);
            }
            let line = std::str::from_utf8(line).map_err(|_| FrameError::NotUtf8)?;
            let Some((name, value)) = line.split_once(':') else {
                return Err(FrameError::MissingColon(line.to_owned()));
            };
            let raw_headers = !self.escapes || cmd == "CONNECT" || cmd == "STOMP";
            if raw_headers {
                headers.push((name.to_owned(), value.to_owned()));
            } else {
                headers.push((unescape(name)?, unescape(value)?));
            }
        }
    }
}

fn unescape(s: &str) -> Result<String, FrameError> {
    if !s.contains('\\') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('c') => out.push(':'),
            Some(other) => return Err(FrameError::BadEscape(format!("\\{other}"))),
            None => return Err(FrameError::BadEscape("\\".to_owned())),
        }
    }
    Ok(out)
}

fn escape_into(out: &mut Vec<u8>, s: &str, escapes: bool) {
    let bytes = s.as_bytes();
    // Runs of plain bytes are copied whole; most values have no escapes.
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let replacement: &[u8] = match (b, escapes) {
            (b'\\', true) => b"\\\\",
            (b'\n', true) => b"\\n",
            (b'\r', true) => b"\\r",
            (b':', true) => b"\\c",
            // Without escaping (STOMP 1.0, CONNECTED) a line break would
            // end the header and let a value inject headers: drop it.
            (b'\n' | b'\r', false) => b"",
            // STOMP cannot escape a NUL, and one would end the frame: an
            // AMQP publisher may put one in a header. Dropped.
            (0, _) => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        out.extend_from_slice(replacement);
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
}

/// Encodes a server frame header by header, straight into its bytes: the
/// path of every delivery, which builds no [`Frame`].
pub struct FrameWriter {
    out: Vec<u8>,
    escapes: bool,
    has_length: bool,
}

impl FrameWriter {
    /// `capacity`: the bytes expected, body included, so that the buffer
    /// is allocated once.
    pub fn new(command: &str, escapes: bool, capacity: usize) -> FrameWriter {
        let mut out = Vec::with_capacity(capacity + 24);
        out.extend_from_slice(command.as_bytes());
        out.push(b'\n');
        FrameWriter {
            out,
            escapes,
            has_length: false,
        }
    }

    /// A header whose value is `parts` joined.
    pub fn header_parts(&mut self, name: &str, parts: &[&str]) {
        self.has_length |= name == "content-length";
        escape_into(&mut self.out, name, self.escapes);
        self.out.push(b':');
        for part in parts {
            escape_into(&mut self.out, part, self.escapes);
        }
        self.out.push(b'\n');
    }

    pub fn header(&mut self, name: &str, value: &str) {
        self.header_parts(name, &[value]);
    }

    pub fn header_number(&mut self, name: &str, value: u64) {
        self.header(name, itoa::Buffer::new().format(value));
    }

    /// The frame's bytes: `content-length` is added for a non-empty body
    /// that does not carry one.
    pub fn finish(mut self, body: &[u8]) -> Vec<u8> {
        if !body.is_empty() && !self.has_length {
            self.header_number("content-length", body.len() as u64);
        }
        self.out.push(b'\n');
        self.out.extend_from_slice(body);
        self.out.push(0);
        self.out
    }
}

/// Encodes a server frame. `content-length` is added for a non-empty body
/// that does not carry one. `escapes` is false for STOMP 1.0 sessions;
/// CONNECTED is never escaped, as STOMP 1.2 requires.
pub fn encode(frame: &Frame, escapes: bool) -> Vec<u8> {
    let escapes = escapes && frame.command != "CONNECTED";
    let mut out = FrameWriter::new(&frame.command, escapes, frame.wire_len());
    for (name, value) in &frame.headers {
        out.header(name, value);
    }
    out.finish(&frame.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        Decoder::new(Limits {
            max_frame_bytes: 1024,
            max_headers: 4,
            max_header_bytes: 64,
        })
    }

    #[test]
    fn unescape_handles_every_defined_escape() {
        assert_eq!(unescape(r"a\\b\nc\rd\ce").unwrap(), "a\\b\nc\rd:e");
        assert_eq!(
            unescape(r"x\t"),
            Err(FrameError::BadEscape("\\t".to_owned()))
        );
    }

    #[test]
    fn scanned_offset_resumes_the_nul_search() {
        let mut d = decoder();
        d.feed(b"SEND\ndestination:/topic/a\n\nab");
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.head.as_ref().map(|h| h.scanned), Some(2));
        d.feed(b"c\0");
        assert_eq!(d.next_frame().unwrap().unwrap().body.as_ref(), b"abc");
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_head_fed_byte_by_byte_is_searched_once() {
        let mut d = Decoder::new(Limits {
            max_frame_bytes: 1 << 20,
            max_headers: 10_000,
            max_header_bytes: 1 << 20,
        });
        let mut frame = b"SEND\ndestination:/topic/a\n".to_vec();
        for i in 0..2000 {
            frame.extend_from_slice(format!("h{i}:{}\n", "v".repeat(100)).as_bytes());
        }
        frame.extend_from_slice(b"\nbody\0");
        for (i, b) in frame.iter().enumerate() {
            d.feed(&[*b]);
            let got = d.next_frame().unwrap();
            assert_eq!(got.is_some(), i == frame.len() - 1);
            // Each arrival searches only itself, not the head again.
            if d.head.is_none() {
                assert_eq!(d.head_scan.searched, d.buffered(), "at byte {i}");
            }
        }
    }

    #[test]
    fn a_heart_beat_split_between_arrivals_is_still_a_heart_beat() {
        let mut d = decoder();
        d.feed(b"\r");
        assert_eq!(d.next_frame().unwrap(), None);
        d.feed(b"\nSEND\n\n\0");
        let frame = d.next_frame().unwrap().expect("a frame");
        assert_eq!(frame.command, "SEND");
    }

    #[test]
    fn a_nul_in_a_header_is_refused_and_never_written() {
        let mut d = decoder();
        d.feed(b"SEND\ndestination:/topic/a\naaa:x\0ERROR\n\n\0");
        assert_eq!(d.next_frame(), Err(FrameError::NulInHeader));
        let bytes = encode(&Frame::new("MESSAGE").header("h", "x\0ERROR"), true);
        assert_eq!(bytes, b"MESSAGE\nh:xERROR\n\n\0");
    }
}
