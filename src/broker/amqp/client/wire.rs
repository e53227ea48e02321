//! The frames that come with every delivery, `basic.deliver` and its
//! content header, and `basic.return`, parsed by hand and leniently: a
//! string that is not UTF-8 (RabbitMQ passes on whatever a publisher
//! sent) is left out, or for names that must be there replaced lossily,
//! and counted in `dropped`, so that one odd message never fails the
//! connection that every session on it shares. amq-protocol's parser, used for every
//! other frame, collects each string byte by byte through nom combinators:
//! reading these two by hand took a tenth off the gateway's instructions
//! per delivered message in a fan-out. The results are amq-protocol's own
//! types, and the tests check them against its parser.

use amq_protocol::frame::AMQPContentHeader;
use amq_protocol::protocol::{basic, BasicProperties};
use amq_protocol::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};

/// Tables and arrays nested deeper than this read as void. Any AMQP
/// client can publish such headers, and reading them by recursion could
/// exhaust the stack; nested values have no STOMP form anyway.
const MAX_NESTING: u8 = 16;

/// `basic.deliver` (class 60, method 60), if that is what `payload` holds.
pub fn deliver(payload: &[u8], dropped: &mut u32) -> Option<Result<basic::Deliver, String>> {
    let arguments = payload.strip_prefix(&[0, 60, 0, 60])?;
    Some(Reader::new(arguments, dropped).deliver())
}

/// `basic.return` (class 60, method 50), if that is what `payload` holds.
pub fn returned(payload: &[u8], dropped: &mut u32) -> Option<Result<basic::Return, String>> {
    let arguments = payload.strip_prefix(&[0, 60, 0, 50])?;
    let mut r = Reader::new(arguments, dropped);
    Some((|| {
        Ok(basic::Return {
            reply_code: r.u16()?,
            reply_text: r.lossy_short_string()?,
            exchange: r.lossy_short_string()?,
            routing_key: r.lossy_short_string()?,
        })
    })())
}

/// A content header frame's payload. Like amq-protocol, it reads one word
/// of property flags: the basic class has 14 properties.
pub fn content_header(payload: &[u8], dropped: &mut u32) -> Result<AMQPContentHeader, String> {
    let mut r = Reader::new(payload, dropped);
    let class_id = r.u16()?;
    let _weight = r.u16()?;
    let body_size = r.u64()?;
    let flags = r.u16()?;
    let has = |bit: u16| flags & (1 << (15 - bit)) != 0;
    let mut p = BasicProperties::default();
    if has(0) {
        if let Some(v) = r.short_string()? {
            p = p.with_content_type(v);
        }
    }
    if has(1) {
        if let Some(v) = r.short_string()? {
            p = p.with_content_encoding(v);
        }
    }
    if has(2) {
        p = p.with_headers(r.table(0)?);
    }
    if has(3) {
        p = p.with_delivery_mode(r.u8()?);
    }
    if has(4) {
        p = p.with_priority(r.u8()?);
    }
    if has(5) {
        if let Some(v) = r.short_string()? {
            p = p.with_correlation_id(v);
        }
    }
    if has(6) {
        if let Some(v) = r.short_string()? {
            p = p.with_reply_to(v);
        }
    }
    if has(7) {
        if let Some(v) = r.short_string()? {
            p = p.with_expiration(v);
        }
    }
    if has(8) {
        if let Some(v) = r.short_string()? {
            p = p.with_message_id(v);
        }
    }
    if has(9) {
        p = p.with_timestamp(r.u64()?);
    }
    if has(10) {
        if let Some(v) = r.short_string()? {
            p = p.with_type(v);
        }
    }
    if has(11) {
        if let Some(v) = r.short_string()? {
            p = p.with_user_id(v);
        }
    }
    if has(12) {
        if let Some(v) = r.short_string()? {
            p = p.with_app_id(v);
        }
    }
    if has(13) {
        if let Some(v) = r.short_string()? {
            p = p.with_cluster_id(v);
        }
    }
    Ok(AMQPContentHeader {
        class_id,
        body_size,
        properties: p,
    })
}

struct Reader<'a, 'd> {
    rest: &'a [u8],
    /// Strings left out for not being UTF-8.
    dropped: &'d mut u32,
}

impl<'a, 'd> Reader<'a, 'd> {
    fn new(rest: &'a [u8], dropped: &'d mut u32) -> Self {
        Reader { rest, dropped }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err("a truncated frame".into());
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn deliver(&mut self) -> Result<basic::Deliver, String> {
        Ok(basic::Deliver {
            consumer_tag: self.lossy_short_string()?,
            delivery_tag: self.u64()?,
            redelivered: self.u8()? & 1 != 0,
            exchange: self.lossy_short_string()?,
            routing_key: self.lossy_short_string()?,
        })
    }

    fn long_bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A short string, or None (counted) when it is not UTF-8.
    fn short_string(&mut self) -> Result<Option<ShortString>, String> {
        let n = self.u8()? as usize;
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Some(ShortString::from(s))),
            Err(_) => {
                *self.dropped += 1;
                Ok(None)
            }
        }
    }

    /// A short string that must be there (an exchange, a routing key):
    /// bytes that are not UTF-8 become U+FFFD, counted.
    fn lossy_short_string(&mut self) -> Result<ShortString, String> {
        let n = self.u8()? as usize;
        let bytes = self.take(n)?;
        match String::from_utf8_lossy(bytes) {
            std::borrow::Cow::Borrowed(s) => Ok(ShortString::from(s)),
            std::borrow::Cow::Owned(s) => {
                *self.dropped += 1;
                Ok(ShortString::from(s))
            }
        }
    }

    /// A field table `depth` tables or arrays down.
    fn table(&mut self, depth: u8) -> Result<FieldTable, String> {
        let mut fields = Reader::new(self.long_bytes()?, self.dropped);
        let mut table = FieldTable::default();
        while !fields.rest.is_empty() {
            let name = fields.short_string()?;
            let value = fields.value(depth)?;
            // A field whose name is not UTF-8 is left out.
            if let Some(name) = name {
                table.insert(name, value);
            }
        }
        Ok(table)
    }

    /// A field value in a table or array `depth` down; the type letters
    /// are RabbitMQ's, as amq-protocol reads them.
    fn value(&mut self, depth: u8) -> Result<AMQPValue, String> {
        Ok(match self.u8()? {
            b't' => AMQPValue::Boolean(self.u8()? != 0),
            b'b' => AMQPValue::ShortShortInt(i8::from_be_bytes(self.array()?)),
            b'B' => AMQPValue::ShortShortUInt(self.u8()?),
            b's' | b'U' => AMQPValue::ShortInt(i16::from_be_bytes(self.array()?)),
            b'u' => AMQPValue::ShortUInt(self.u16()?),
            b'I' => AMQPValue::LongInt(i32::from_be_bytes(self.array()?)),
            b'i' => AMQPValue::LongUInt(self.u32()?),
            b'L' | b'l' => AMQPValue::LongLongInt(i64::from_be_bytes(self.array()?)),
            b'f' => AMQPValue::Float(f32::from_be_bytes(self.array()?)),
            b'd' => AMQPValue::Double(f64::from_be_bytes(self.array()?)),
            b'D' => AMQPValue::DecimalValue(DecimalValue {
                scale: self.u8()?,
                value: self.u32()?,
            }),
            b'S' => AMQPValue::LongString(LongString::from(self.long_bytes()?)),
            b'A' | b'F' if depth >= MAX_NESTING => {
                self.long_bytes()?;
                AMQPValue::Void
            }
            b'A' => {
                let mut values = Reader::new(self.long_bytes()?, self.dropped);
                let mut array = Vec::new();
                while !values.rest.is_empty() {
                    array.push(values.value(depth + 1)?);
                }
                AMQPValue::FieldArray(FieldArray::from(array))
            }
            b'T' => AMQPValue::Timestamp(self.u64()?),
            b'F' => AMQPValue::FieldTable(self.table(depth + 1)?),
            b'x' => AMQPValue::ByteArray(ByteArray::from(self.long_bytes()?)),
            b'V' => AMQPValue::Void,
            other => return Err(format!("a field value of unknown type {:?}", other as char)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
    use amq_protocol::protocol::AMQPClass;

    /// A frame's payload as amq-protocol writes it.
    fn payload(frame: &AMQPFrame) -> Vec<u8> {
        let (bytes, _) = gen_frame(frame)(WriteContext::from(Vec::new()))
            .expect("encodes")
            .into_inner();
        // Type, channel, size; then the payload and the end marker.
        bytes[7..bytes.len() - 1].to_vec()
    }

    #[test]
    fn deliver_reads_as_amq_protocol_reads_it() {
        let expected = basic::Deliver {
            consumer_tag: "stompgate.abc".into(),
            delivery_tag: u64::MAX - 1,
            redelivered: true,
            exchange: "amq.topic".into(),
            routing_key: "no01.한겨레".into(),
        };
        let bytes = payload(&AMQPFrame::Method(
            7,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(expected.clone())),
        ));
        assert_eq!(
            deliver(&bytes, &mut 0).expect("a deliver").unwrap(),
            expected
        );
        let (_, theirs) = amq_protocol::protocol::parse_class(&bytes[..]).unwrap();
        assert_eq!(
            theirs,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(expected.clone()))
        );
        // Other methods are left to amq-protocol; cut frames are errors.
        assert!(deliver(&[0, 60, 0, 80, 0], &mut 0).is_none());
        assert!(deliver(&bytes[..bytes.len() - 1], &mut 0).unwrap().is_err());
    }

    #[test]
    fn content_header_reads_as_amq_protocol_reads_it() {
        let mut nested = FieldTable::default();
        nested.insert("n".into(), AMQPValue::LongLongInt(-5));
        let mut table = FieldTable::default();
        let values = [
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-3),
            AMQPValue::ShortShortUInt(250),
            AMQPValue::ShortInt(-300),
            AMQPValue::ShortUInt(60_000),
            AMQPValue::LongInt(-70_000),
            AMQPValue::LongUInt(4_000_000_000),
            AMQPValue::LongLongInt(i64::MIN),
            AMQPValue::Float(1.5),
            AMQPValue::Double(-2.25),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 31_415,
            }),
            AMQPValue::LongString(LongString::from("값:1\n")),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::ShortShortUInt(1),
                AMQPValue::LongString(LongString::from("x")),
            ])),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::FieldTable(nested),
            AMQPValue::ByteArray(ByteArray::from(&b"\0\xff"[..])),
            AMQPValue::Void,
        ];
        for (i, value) in values.into_iter().enumerate() {
            table.insert(format!("h{i}").into(), value);
        }
        let full = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_content_encoding("gzip".into())
            .with_headers(table)
            .with_delivery_mode(2)
            .with_priority(9)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("60000".into())
            .with_message_id("m".into())
            .with_timestamp(42)
            .with_type("t".into())
            .with_user_id("guest".into())
            .with_app_id("a".into())
            .with_cluster_id("k".into());
        for properties in [full, BasicProperties::default().with_priority(1)] {
            let header = AMQPContentHeader {
                class_id: 60,
                body_size: 1 << 40,
                properties,
            };
            let bytes = payload(&AMQPFrame::Header(3, header.clone()));
            let ours = content_header(&bytes, &mut 0).unwrap();
            let (_, theirs) =
                amq_protocol::frame::parsing::parse_content_header(&bytes[..]).unwrap();
            assert_eq!(ours, theirs);
            assert_eq!(ours, header);
            assert!(content_header(&bytes[..bytes.len() - 1], &mut 0).is_err());
        }
    }

    #[test]
    fn deep_nesting_reads_as_void_below_the_limit() {
        let mut value = AMQPValue::Boolean(true);
        for _ in 0..200 {
            let mut table = FieldTable::default();
            table.insert("t".into(), value);
            value = AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(table)]));
        }
        let mut headers = FieldTable::default();
        headers.insert("deep".into(), value);
        headers.insert("after".into(), AMQPValue::LongString("kept".into()));
        let header = AMQPContentHeader {
            class_id: 60,
            body_size: 0,
            properties: BasicProperties::default().with_headers(headers),
        };
        let ours = content_header(&payload(&AMQPFrame::Header(1, header)), &mut 0).unwrap();
        let headers = ours.properties.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("after"),
            Some(&AMQPValue::LongString("kept".into()))
        );
        let mut levels = 0;
        let mut value = headers.inner().get("deep").unwrap();
        loop {
            value = match value {
                AMQPValue::FieldArray(array) => &array.as_slice()[0],
                AMQPValue::FieldTable(table) => table.inner().get("t").unwrap(),
                AMQPValue::Void => break,
                other => panic!("unexpected {other:?} at level {levels}"),
            };
            levels += 1;
        }
        assert_eq!(levels, MAX_NESTING as usize);
    }

    /// A content header written by hand, as a publisher that does not
    /// check UTF-8 would: a header table with a bad name between two
    /// good ones, and a message-id that is not UTF-8.
    fn header_with_bad_strings() -> Vec<u8> {
        let mut table = Vec::new();
        for (name, value) in [
            (&b"good"[..], &b"1"[..]),
            (b"bad\xff", b"2"),
            (b"also", b"3"),
        ] {
            table.push(name.len() as u8);
            table.extend_from_slice(name);
            table.push(b'S');
            table.extend_from_slice(&(value.len() as u32).to_be_bytes());
            table.extend_from_slice(value);
        }
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&5u64.to_be_bytes());
        // content-type, headers, message-id
        p.extend_from_slice(&((1u16 << 15) | (1 << 13) | (1 << 7)).to_be_bytes());
        p.push(10);
        p.extend_from_slice(b"text/plain");
        p.extend_from_slice(&(table.len() as u32).to_be_bytes());
        p.extend_from_slice(&table);
        p.push(3);
        p.extend_from_slice(b"m\xc3\x28");
        p
    }

    #[test]
    fn strings_that_are_not_utf8_are_left_out_and_counted() {
        let mut dropped = 0;
        let header = content_header(&header_with_bad_strings(), &mut dropped).unwrap();
        assert_eq!(dropped, 2, "the bad header name and the bad message-id");
        let p = &header.properties;
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(p.message_id(), &None);
        let names: Vec<_> = p
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect();
        assert_eq!(names, ["also", "good"]);
        assert_eq!(header.body_size, 5);
    }

    #[test]
    fn a_routing_key_that_is_not_utf8_is_kept_lossily() {
        let mut p = vec![0, 60, 0, 60, 3];
        p.extend_from_slice(b"tag");
        p.extend_from_slice(&9u64.to_be_bytes());
        p.push(0);
        p.push(9);
        p.extend_from_slice(b"amq.topic");
        p.push(5);
        p.extend_from_slice(b"no\xff01");
        let mut dropped = 0;
        let deliver = deliver(&p, &mut dropped).unwrap().unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(deliver.routing_key.as_str(), "no\u{fffd}01");
        assert_eq!(deliver.delivery_tag, 9);

        let mut r = vec![0, 60, 0, 50, 1, 56, 3];
        r.extend_from_slice(b"NO\xfe");
        r.push(0);
        r.push(2);
        r.extend_from_slice(b"k\x80");
        let mut dropped = 0;
        let returned = returned(&r, &mut dropped).unwrap().unwrap();
        assert_eq!((returned.reply_code, dropped), (312, 2));
        assert!(returned.exchange.as_str().is_empty());
    }
}
