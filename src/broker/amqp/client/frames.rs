//! AMQP frames on the wire: the outbox where channels queue what goes
//! to the broker (the hot basic methods encoded by hand, the rest by
//! amq-protocol), and frames read off the socket, the hot ones parsed by
//! [`wire`].

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, AMQPClass, BasicProperties};
use amq_protocol::types::AMQPValue;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::broker::amqp::client::wire;

use super::{Stream, FRAME_MAX, STAMP_HEADER};

pub(super) const FRAME_METHOD: u8 = 1;
pub(super) const FRAME_HEADER: u8 = 2;
pub(super) const FRAME_BODY: u8 = 3;
pub(super) const FRAME_HEARTBEAT: u8 = 8;
pub(super) const FRAME_END: u8 = 0xCE;
/// Type, channel and size: what precedes every frame's payload.
pub(super) const FRAME_HEAD: usize = 7;
pub(super) const PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";
pub(super) const CLASS_BASIC: u16 = 60;

#[derive(Default)]
pub(super) struct Outbox {
    pub(super) bytes: BytesMut,
    /// gen_frame writes into a Vec; kept to reuse its allocation.
    pub(super) scratch: Vec<u8>,
}

impl Outbox {
    pub(super) fn frame(&mut self, frame: &AMQPFrame) {
        let scratch = std::mem::take(&mut self.scratch);
        match gen_frame(frame)(WriteContext::from(scratch)) {
            Ok(context) => {
                let (mut scratch, _) = context.into_inner();
                self.bytes.extend_from_slice(&scratch);
                scratch.clear();
                self.scratch = scratch;
            }
            // Only a value too long for its AMQP type fails, and the
            // adapter checks lengths before it gets here.
            Err(e) => tracing::error!(error = %e, "could not encode an AMQP frame"),
        }
    }

    pub(super) fn method(&mut self, channel: u16, method: AMQPClass) {
        self.frame(&AMQPFrame::Method(channel, method));
    }

    /// A method frame whose arguments `args` writes, for the hot methods.
    pub(super) fn raw_method(
        &mut self,
        channel: u16,
        method: u16,
        args: impl FnOnce(&mut BytesMut),
    ) {
        let b = &mut self.bytes;
        b.put_u8(FRAME_METHOD);
        b.put_u16(channel);
        let size_at = b.len();
        b.put_u32(0);
        b.put_u16(CLASS_BASIC);
        b.put_u16(method);
        args(b);
        let size = (b.len() - size_at - 4) as u32;
        b[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
        b.put_u8(FRAME_END);
    }
}

pub(super) fn put_short_string(b: &mut BytesMut, s: &str) {
    // Callers pass names the adapter checked to fit in 255 bytes.
    let s = &s.as_bytes()[..s.len().min(255)];
    b.put_u8(s.len() as u8);
    b.put_slice(s);
}

pub(super) fn close_method(reply_text: &str) -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
        reply_code: 200,
        reply_text: reply_text.into(),
        class_id: 0,
        method_id: 0,
    }))
}

/// A method's AMQP name, for messages.
pub(super) fn method_name(method: &AMQPClass) -> String {
    let debug = format!("{method:?}");
    // `Queue(Bind(Bind { … }))` → `queue.bind`
    let mut parts = debug.split('(').take(2).map(str::to_ascii_lowercase);
    match (parts.next(), parts.next()) {
        (Some(class), Some(method)) => format!("{class}.{method}"),
        _ => debug,
    }
}

/// The [`STAMP_HEADER`] of a message, as [`Channel::publish`] set it.
pub(super) fn stamp_of(properties: &BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(STAMP_HEADER)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// A parsed frame. Bodies are slices of the read buffer, not copies.
pub(super) enum Frame {
    Method(u16, AMQPClass),
    Header(u16, AMQPContentHeader),
    Body(u16, Bytes),
    Heartbeat,
    /// A method or header whose payload could not be read: on a channel,
    /// that channel is given up; on channel 0, the connection.
    Malformed(u16, String),
}

/// The next whole frame in `buf`, if one is there; `dropped` counts the
/// strings left out of it for not being UTF-8. An error is a fault in the
/// framing itself, after which nothing more can be read.
pub(super) fn parse_frame(
    buf: &mut BytesMut,
    frame_max: usize,
    dropped: &mut u32,
) -> Result<Option<Frame>, String> {
    if buf.len() < FRAME_HEAD {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size > frame_max {
        return Err(format!(
            "a frame of {size} bytes, over frame_max {frame_max}"
        ));
    }
    if buf.len() < FRAME_HEAD + size + 1 {
        buf.reserve(FRAME_HEAD + size + 1 - buf.len());
        return Ok(None);
    }
    if buf[FRAME_HEAD + size] != FRAME_END {
        return Err("a frame without its end marker".into());
    }
    buf.advance(FRAME_HEAD);
    let payload = buf.split_to(size);
    buf.advance(1);
    let method = |dropped: &mut u32| -> Result<AMQPClass, String> {
        if let Some(deliver) = wire::deliver(&payload, dropped) {
            return Ok(AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver?)));
        }
        if let Some(returned) = wire::returned(&payload, dropped) {
            return Ok(AMQPClass::Basic(basic::AMQPMethod::Return(returned?)));
        }
        amq_protocol::protocol::parse_class(&payload[..])
            .map(|(_, method)| method)
            .map_err(|e| format!("a malformed method: {e:?}"))
    };
    Ok(Some(match kind {
        FRAME_METHOD => match method(dropped) {
            Ok(method) => Frame::Method(channel, method),
            Err(why) => Frame::Malformed(channel, why),
        },
        FRAME_HEADER => match wire::content_header(&payload, dropped) {
            Ok(header) => Frame::Header(channel, header),
            Err(why) => Frame::Malformed(channel, format!("a malformed content header: {why}")),
        },
        FRAME_BODY => Frame::Body(channel, payload.freeze()),
        FRAME_HEARTBEAT => Frame::Heartbeat,
        other => return Err(format!("a frame of unknown type {other}")),
    }))
}

pub(super) async fn read_frame(
    stream: &mut Box<dyn Stream>,
    buf: &mut BytesMut,
) -> Result<Frame, String> {
    loop {
        if let Some(frame) = parse_frame(buf, FRAME_MAX as usize, &mut 0)? {
            return Ok(frame);
        }
        if stream.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the broker closed the connection during the handshake".into());
        }
    }
}

/// A method the handshake expects; a Connection.Close is the broker's
/// refusal (wrong password, unknown vhost) and says why.
pub(super) async fn read_method(
    stream: &mut Box<dyn Stream>,
    buf: &mut BytesMut,
) -> Result<connection::AMQPMethod, String> {
    loop {
        match read_frame(stream, buf).await? {
            Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                return Err(format!(
                    "the broker refused the connection: {} {}",
                    close.reply_code,
                    close.reply_text.as_str()
                ))
            }
            Frame::Method(0, AMQPClass::Connection(method)) => return Ok(method),
            Frame::Heartbeat => {}
            Frame::Malformed(_, why) => return Err(format!("during the handshake: {why}")),
            _ => return Err("an unexpected frame during the handshake".into()),
        }
    }
}

pub(super) async fn write_method(
    stream: &mut Box<dyn Stream>,
    method: connection::AMQPMethod,
) -> Result<(), String> {
    let mut outbox = Outbox::default();
    outbox.method(0, AMQPClass::Connection(method));
    stream
        .write_all(&outbox.bytes)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(bytes);
        let mut dropped = 0;
        let mut frames = Vec::new();
        while let Some(frame) = parse_frame(&mut buf, FRAME_MAX as usize, &mut dropped).unwrap() {
            frames.push(frame);
        }
        assert!(buf.is_empty(), "{} bytes left", buf.len());
        frames
    }

    #[test]
    fn hand_encoded_methods_read_as_amq_protocol_encodes_them() {
        let mut outbox = Outbox::default();
        // basic.ack: delivery tag, then the `multiple` bit.
        outbox.raw_method(7, 80, |b| {
            b.put_u64(42);
            b.put_u8(1);
        });
        let by_hand = outbox.bytes.split().freeze();
        let ack = basic::Ack {
            delivery_tag: 42,
            multiple: true,
        };
        outbox.method(7, AMQPClass::Basic(basic::AMQPMethod::Ack(ack.clone())));
        assert_eq!(by_hand, outbox.bytes.split().freeze());
        match parse_all(&by_hand).as_slice() {
            [Frame::Method(7, AMQPClass::Basic(basic::AMQPMethod::Ack(read)))] => {
                assert_eq!(read, &ack);
            }
            _ => panic!("basic.ack does not read back"),
        }
        put_short_string(&mut outbox.bytes, &"q".repeat(300));
        assert_eq!(outbox.bytes[0], 255, "a short string is cut to 255 bytes");
    }

    #[test]
    fn frames_are_read_whole_and_bad_framing_is_refused() {
        let mut outbox = Outbox::default();
        outbox.method(3, close_method("bye"));
        let mut bytes = outbox.bytes.split().to_vec();
        bytes.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
        // Byte by byte: nothing until a frame is whole.
        let mut buf = BytesMut::new();
        let mut dropped = 0;
        let mut frames = Vec::new();
        for byte in &bytes {
            buf.put_u8(*byte);
            if let Some(frame) = parse_frame(&mut buf, 4096, &mut dropped).unwrap() {
                frames.push(frame);
            }
        }
        assert!(matches!(
            frames.as_slice(),
            [Frame::Method(3, AMQPClass::Channel(_)), Frame::Heartbeat]
        ));
        // Over frame_max, without its end marker, of an unknown type.
        let mut big = BytesMut::from(&[FRAME_BODY, 0, 1, 0, 1, 0, 0][..]);
        assert!(parse_frame(&mut big, 4096, &mut dropped).is_err());
        let mut unended = BytesMut::from(&[FRAME_BODY, 0, 1, 0, 0, 0, 1, b'x', 0][..]);
        assert!(parse_frame(&mut unended, 4096, &mut dropped).is_err());
        let mut unknown = BytesMut::from(&[9, 0, 1, 0, 0, 0, 0, FRAME_END][..]);
        assert!(parse_frame(&mut unknown, 4096, &mut dropped).is_err());
        // A method that does not parse ends its channel, not the reading.
        let mut garbage =
            BytesMut::from(&[FRAME_METHOD, 0, 5, 0, 0, 0, 2, 0xff, 0xff, FRAME_END][..]);
        assert!(matches!(
            parse_frame(&mut garbage, 4096, &mut dropped),
            Ok(Some(Frame::Malformed(5, _)))
        ));
    }
}
