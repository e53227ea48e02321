//! The two frames that come with every delivery, `basic.deliver` and its
//! content header, parsed by hand. amq-protocol's parser, used for every
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
pub fn deliver(payload: &[u8]) -> Option<Result<basic::Deliver, String>> {
    let arguments = payload.strip_prefix(&[0, 60, 0, 60])?;
    Some(Reader(arguments).deliver())
}

/// A content header frame's payload. Like amq-protocol, it reads one word
/// of property flags: the basic class has 14 properties.
pub fn content_header(payload: &[u8]) -> Result<AMQPContentHeader, String> {
    let mut r = Reader(payload);
    let class_id = r.u16()?;
    let _weight = r.u16()?;
    let body_size = r.u64()?;
    let flags = r.u16()?;
    let has = |bit: u16| flags & (1 << (15 - bit)) != 0;
    let mut p = BasicProperties::default();
    if has(0) {
        p = p.with_content_type(r.short_string()?);
    }
    if has(1) {
        p = p.with_content_encoding(r.short_string()?);
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
        p = p.with_correlation_id(r.short_string()?);
    }
    if has(6) {
        p = p.with_reply_to(r.short_string()?);
    }
    if has(7) {
        p = p.with_expiration(r.short_string()?);
    }
    if has(8) {
        p = p.with_message_id(r.short_string()?);
    }
    if has(9) {
        p = p.with_timestamp(r.u64()?);
    }
    if has(10) {
        p = p.with_type(r.short_string()?);
    }
    if has(11) {
        p = p.with_user_id(r.short_string()?);
    }
    if has(12) {
        p = p.with_app_id(r.short_string()?);
    }
    if has(13) {
        p = p.with_cluster_id(r.short_string()?);
    }
    Ok(AMQPContentHeader {
        class_id,
        body_size,
        properties: p,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a truncated frame".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
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
            consumer_tag: self.short_string()?,
            delivery_tag: self.u64()?,
            redelivered: self.u8()? & 1 != 0,
            exchange: self.short_string()?,
            routing_key: self.short_string()?,
        })
    }

    fn long_bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn short_string(&mut self) -> Result<ShortString, String> {
        let n = self.u8()? as usize;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(ShortString::from)
            .map_err(|_| "a short string that is not UTF-8".into())
    }

    /// A field table `depth` tables or arrays down.
    fn table(&mut self, depth: u8) -> Result<FieldTable, String> {
        let mut fields = Reader(self.long_bytes()?);
        let mut table = FieldTable::default();
        while !fields.0.is_empty() {
            let name = fields.short_string()?;
            table.insert(name, fields.value(depth)?);
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
                let mut values = Reader(self.long_bytes()?);
                let mut array = Vec::new();
                while !values.0.is_empty() {
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
        assert_eq!(deliver(&bytes).expect("a deliver").unwrap(), expected);
        let (_, theirs) = amq_protocol::protocol::parse_class(&bytes[..]).unwrap();
        assert_eq!(
            theirs,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(expected.clone()))
        );
        // Other methods are left to amq-protocol; cut frames are errors.
        assert!(deliver(&[0, 60, 0, 80, 0]).is_none());
        assert!(deliver(&bytes[..bytes.len() - 1]).unwrap().is_err());
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
            let ours = content_header(&bytes).unwrap();
            let (_, theirs) =
                amq_protocol::frame::parsing::parse_content_header(&bytes[..]).unwrap();
            assert_eq!(ours, theirs);
            assert_eq!(ours, header);
            assert!(content_header(&bytes[..bytes.len() - 1]).is_err());
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
        let ours = content_header(&payload(&AMQPFrame::Header(1, header))).unwrap();
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
}
