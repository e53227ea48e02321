//! The session's `/presence/<key>` subscriptions: the grant they need,
//! and the MESSAGEs the node's presence hands them (see
//! [`crate::presence`]). They bind nothing on the session's queue.

use std::sync::atomic::Ordering;

use crate::broker::Broker;
use crate::destination::{Route, Use};
use crate::stomp::command::AckMode;
use crate::stomp::frame::FrameWriter;

use super::{denied_by_grants, End, Session, SessionError};

impl<B: Broker> Session<B> {
    /// SUBSCRIBE to `/presence/<key>`, its id already checked.
    pub(super) fn watch(
        &mut self,
        id: String,
        destination: &str,
        key: &str,
        ack: AckMode,
    ) -> Result<(), SessionError> {
        // Watching who reads a key is reading it.
        let route = Route {
            exchange: self.config.amqp.exchange.clone(),
            key: key.to_owned(),
        };
        if !self.grants.may_subscribe(&route) {
            return Err(denied_by_grants(Use::Subscribe, destination));
        }
        if ack.needs_ack() {
            return Err(SessionError::Protocol(format!(
                "{destination:?}: presence subscriptions take ack:auto (their MESSAGEs are \
                 not messages of the broker's to ack)"
            )));
        }
        if !self.presence.watch(&id, key) {
            return Err(SessionError::Denied {
                rule: "presence.enabled",
                detail: "presence is turned off on this gateway (presence.enabled)".into(),
            });
        }
        self.metrics.subscriptions.inc();
        self.entry.subscribed(&id, destination);
        Ok(())
    }

    /// Writes what the node's presence left for this session's watches.
    pub(super) async fn presence_arrived(&mut self) -> Result<(), End> {
        let messages = match self.presence.inbox.take() {
            Ok(messages) => messages,
            Err(_) => {
                let limit = self.config.presence.max_pending;
                let error = SessionError::Limit {
                    key: "presence.max_pending",
                    detail: format!(
                        "more than presence.max_pending ({limit}) presence MESSAGEs waited \
                         for this client: it reads too slowly"
                    ),
                };
                return Err(self.fail(error, None).await);
            }
        };
        for message in messages {
            // Unsubscribed since it was queued.
            if !self.presence.watching(&message.subscription) {
                continue;
            }
            let number = self.next_message;
            self.next_message += 1;
            let mut frame = FrameWriter::new("MESSAGE", self.conn.escapes, 256);
            frame.header("subscription", &message.subscription);
            frame.header_number("message-id", number);
            frame.header("destination", &message.destination);
            for (name, value) in &message.headers {
                frame.header(name, value);
            }
            self.conn.write_message(frame.finish(&message.body)).await?;
            self.metrics.messages_delivered.inc();
            self.entry.messages_out.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
