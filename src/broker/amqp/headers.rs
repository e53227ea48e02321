//! STOMP headers ↔ AMQP properties and headers: what a SEND's headers
//! become on the message, what a delivery's properties become on its
//! MESSAGE, and which headers never cross (STOMP's own, the gateway's).

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::client::STAMP_HEADER;
use crate::broker::{BrokerError, Sender};

/// STOMP headers that describe the frame itself, not the message, or
/// that only a server sets: they never travel to RabbitMQ from a SEND,
/// nor reach a MESSAGE from an AMQP publisher's headers. A client cannot
/// forge a receipt, a message id, a subscription or who it is.
pub(super) const STOMP_OWN_HEADERS: [&str; 11] = [
    STAMP_HEADER,
    "destination",
    "receipt",
    "receipt-id",
    "transaction",
    "content-length",
    "message-id",
    "subscription",
    "ack",
    "redelivered",
    "user-id",
];

/// Headers the gateway sets (`stompgate-gap`…) start with this: whoever
/// else sets them, a SEND's client or an AMQP publisher, is ignored.
pub(super) const GATEWAY_PREFIX: &str = "stompgate-";

/// Whether a header is STOMP's or the gateway's own, never a message's.
pub(super) fn reserved(name: &str) -> bool {
    STOMP_OWN_HEADERS.contains(&name) || name.starts_with(GATEWAY_PREFIX)
}

/// Who sent a message from a STOMP SEND: set by the gateway from the
/// session, on the message (AMQP headers) and on its MESSAGE frames.
pub(super) const SENDER_SESSION: &str = "stompgate-sender-session";
pub(super) const SENDER_USER: &str = "stompgate-sender-user";

pub(super) fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s)
        .map_err(|_| BrokerError::Invalid(format!("{s:?} is longer than AMQP's 255 bytes")))
}

/// SEND headers → AMQP properties (the contract's six, plus
/// `amqp-message-id`) and application headers for the rest. The first of
/// repeated headers wins, as in STOMP. With a `sender`, the message
/// carries who sent it, and `user_id` names the gateway's AMQP user
/// (`amqp_user`), which RabbitMQ checks: a reader can tell the gateway
/// set the sender headers (see [`stomp_headers_from`]).
pub(super) fn properties_from_stomp(
    headers: &[(String, String)],
    sender: Option<(&Sender, &str)>,
) -> Result<(BasicProperties, FieldTable), BrokerError> {
    fn invalid(name: &str, value: &str, expected: &str) -> BrokerError {
        BrokerError::Invalid(format!("header {name}:{value} is not {expected}"))
    }
    let mut properties = BasicProperties::default();
    let mut table = FieldTable::default();
    let mut seen: Vec<&str> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if reserved(name) || seen.contains(&name.as_str()) {
            continue;
        }
        seen.push(name);
        properties = match name.as_str() {
            "content-type" => properties.with_content_type(short(value)?),
            "persistent" => match value.as_str() {
                "true" => properties.with_delivery_mode(2),
                "false" => properties.with_delivery_mode(1),
                _ => return Err(invalid(name, value, "true or false")),
            },
            "priority" => properties.with_priority(
                value
                    .parse()
                    .map_err(|_| invalid(name, value, "a number from 0 to 255"))?,
            ),
            "expiration" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid(name, value, "a time to live in milliseconds"));
                }
                properties.with_expiration(short(value)?)
            }
            "reply-to" => properties.with_reply_to(short(value)?),
            "correlation-id" => properties.with_correlation_id(short(value)?),
            "amqp-message-id" => properties.with_message_id(short(value)?),
            _ => {
                table.insert(
                    short(name)?,
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
                properties
            }
        };
    }
    if let Some((sender, amqp_user)) = sender {
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
        table.insert(short(SENDER_SESSION)?, text(&sender.session));
        if let Some(user) = &sender.user {
            table.insert(short(SENDER_USER)?, text(user));
        }
        properties = properties.with_user_id(short(amqp_user)?);
    }
    Ok((properties, table))
}

/// AMQP properties and headers → STOMP headers on MESSAGE, the reverse of
/// [`properties_from_stomp`], so messages from any AMQP client read well.
/// The sender headers pass only on a message whose `user_id` (checked by
/// RabbitMQ against the publishing connection) is one of the gateway's
/// AMQP users, `trusted`: another AMQP client cannot forge them unless it
/// logs in as the gateway does.
pub(super) fn stomp_headers_from(
    properties: &BasicProperties,
    trusted: &[String],
) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    let mut put = |name: &str, value: String| headers.push((name.to_owned(), value));
    if let Some(v) = properties.content_type() {
        put("content-type", v.to_string());
    }
    if let Some(mode) = properties.delivery_mode() {
        put("persistent", (*mode == 2).to_string());
    }
    if let Some(v) = properties.priority() {
        put("priority", v.to_string());
    }
    if let Some(v) = properties.expiration() {
        put("expiration", v.to_string());
    }
    if let Some(v) = properties.reply_to() {
        put("reply-to", v.to_string());
    }
    if let Some(v) = properties.correlation_id() {
        put("correlation-id", v.to_string());
    }
    if let Some(v) = properties.message_id() {
        put("amqp-message-id", v.to_string());
    }
    if let Some(table) = properties.headers() {
        // Asked only of a sender header, not of every delivery.
        let from_gateway = || {
            properties
                .user_id()
                .as_ref()
                .is_some_and(|user| trusted.iter().any(|t| t == user.as_str()))
        };
        for (name, value) in table {
            let name_ = name.as_str();
            let sender = name_ == SENDER_SESSION || name_ == SENDER_USER;
            if reserved(name_) && !(sender && from_gateway()) {
                continue;
            }
            if let Some(text) = value_text(value) {
                put(name.as_str(), text);
            }
        }
    }
    headers
}

/// A header value as text; nested tables and arrays have no STOMP form.
pub(super) fn value_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(user: Option<&str>) -> Sender {
        Sender {
            session: "s-1".into(),
            user: user.map(str::to_owned),
        }
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn the_gateway_sets_the_sender_and_a_client_cannot() {
        let client = vec![
            (SENDER_SESSION.to_owned(), "forged".to_owned()),
            (SENDER_USER.to_owned(), "root".to_owned()),
            ("x-kept".to_owned(), "yes".to_owned()),
        ];
        let (properties, table) =
            properties_from_stomp(&client, Some((&sender(Some("ann")), "gw"))).unwrap();
        assert_eq!(
            properties.user_id().as_ref().map(|u| u.as_str()),
            Some("gw")
        );
        let read = stomp_headers_from(&properties.with_headers(table), &["gw".into()]);
        assert_eq!(header(&read, SENDER_SESSION), ["s-1"]);
        assert_eq!(header(&read, SENDER_USER), ["ann"]);
        assert_eq!(header(&read, "x-kept"), ["yes"]);
        // Without an authenticated user, none is claimed.
        let (properties, table) =
            properties_from_stomp(&client, Some((&sender(None), "gw"))).unwrap();
        let read = stomp_headers_from(&properties.with_headers(table), &["gw".into()]);
        assert_eq!(header(&read, SENDER_USER), Vec::<&str>::new());
    }

    #[test]
    fn sender_headers_pass_only_from_the_gateways_amqp_users() {
        let (properties, table) =
            properties_from_stomp(&[], Some((&sender(Some("ann")), "gw"))).unwrap();
        let message = properties.with_headers(table.clone());
        // Another gateway user (amqp.urls) is trusted too.
        let read = stomp_headers_from(&message, &["other".into(), "gw".into()]);
        assert_eq!(header(&read, SENDER_SESSION), ["s-1"]);
        // Published as another user, or with no user_id at all.
        for message in [
            message.clone().with_user_id(short("app").unwrap()),
            BasicProperties::default().with_headers(table),
        ] {
            let read = stomp_headers_from(&message, &["gw".into()]);
            assert_eq!(header(&read, SENDER_SESSION), Vec::<&str>::new());
            assert_eq!(header(&read, SENDER_USER), Vec::<&str>::new());
        }
    }
}
