//! The connection's reader task: each frame from the broker goes to its
//! channel (replies to calls, confirms and returns, deliveries assembled
//! from method, header and body frames) or is the connection's own
//! (blocked, close, heart-beats); two silent heart-beat intervals end it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{basic, channel, connection, AMQPClass, BasicProperties};
use amq_protocol::types::ShortString;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::broker::{BrokerError, Confirmed};

use super::frames::{parse_frame, stamp_of, Frame};
use super::holding::{HeldBody, NODE_LIMIT};
use super::{
    lock, ChannelShared, ChannelState, Incoming, Inner, Message, Pending, Phase, CLOSE_WAIT,
};

impl Inner {
    /// What the reader does with one frame; an error ends the connection.
    pub(super) fn on_frame(&self, frame: Frame) -> Result<(), String> {
        let channel_id = match &frame {
            Frame::Heartbeat => return Ok(()),
            Frame::Method(0, method) => return self.on_connection_method(method),
            Frame::Malformed(0, why) => return Err(why.clone()),
            Frame::Method(id, _)
            | Frame::Header(id, _)
            | Frame::Body(id, _)
            | Frame::Malformed(id, _) => *id,
        };
        let Some(channel) = self.channel(channel_id) else {
            // Frames for a channel we no longer hold: nothing waits for them.
            return Ok(());
        };
        let closing = lock(&channel.state).phase == Phase::Closing;
        let frame = match frame {
            Frame::Method(_, method) => return self.on_channel_method(&channel, method),
            // Whatever came for a closing channel is void.
            _ if closing => return Ok(()),
            Frame::Malformed(_, why) => {
                self.abandon(&channel, format!("the broker sent {why}"));
                return Ok(());
            }
            frame => frame,
        };
        let mut state = lock(&channel.state);
        let mut fault = None;
        // How long the session has not come for deliveries: read for a
        // content header only, not for every body frame.
        let idle = match &frame {
            Frame::Header(..) => state.last_take.map_or(Duration::MAX, |t| t.elapsed()),
            _ => Duration::ZERO,
        };
        match frame {
            Frame::Header(_, header) => match state.incoming.as_mut() {
                Some(incoming) => {
                    incoming.size = usize::try_from(header.body_size).unwrap_or(usize::MAX);
                    incoming.properties = header.properties;
                    if let (Some(holding), Some(_)) = (&self.holding, &incoming.deliver) {
                        match holding.admit(&channel, incoming.size, idle) {
                            Ok(held) => incoming.held = Some(held),
                            Err(overrun) => {
                                drop(state);
                                let node = matches!(
                                    overrun,
                                    BrokerError::Overrun { limit, .. } if limit == NODE_LIMIT
                                );
                                self.overrun(&channel, overrun);
                                if node {
                                    channel.cut.cancel();
                                }
                                return Ok(());
                            }
                        }
                    }
                    if incoming.size == 0 {
                        state.complete();
                    }
                }
                None => fault = Some("a content header without a deliver or return"),
            },
            Frame::Body(_, bytes) => match state.incoming.as_mut() {
                Some(incoming) => {
                    if incoming.single.is_none()
                        && incoming.body.is_empty()
                        && bytes.len() == incoming.size
                    {
                        incoming.single = Some(bytes);
                    } else {
                        incoming.body.extend_from_slice(&bytes);
                    }
                    let have = incoming
                        .single
                        .as_ref()
                        .map_or(incoming.body.len(), Bytes::len);
                    if have >= incoming.size {
                        state.complete();
                    }
                }
                None => fault = Some("a content body without a deliver or return"),
            },
            Frame::Method(..) | Frame::Malformed(..) | Frame::Heartbeat => {}
        }
        drop(state);
        if let Some(why) = fault {
            self.abandon(&channel, format!("the broker sent {why}"));
        }
        Ok(())
    }

    pub(super) fn on_connection_method(&self, method: &AMQPClass) -> Result<(), String> {
        match method {
            AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                let _ = self.send(|o| {
                    o.method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    )
                });
                Err(format!(
                    "the broker closed the connection: {} {}",
                    close.reply_code,
                    close.reply_text.as_str()
                ))
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                Err("connection closed".into())
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(blocked)) => {
                let reason = blocked.reason.to_string();
                self.observer.blocked(Some(&reason));
                *lock(&self.blocked) = Some(reason);
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {
                *lock(&self.blocked) = None;
                self.observer.blocked(None);
                Ok(())
            }
            other => {
                tracing::debug!(method = ?other, "ignored a connection method");
                Ok(())
            }
        }
    }

    pub(super) fn on_channel_method(
        &self,
        channel: &ChannelShared,
        method: AMQPClass,
    ) -> Result<(), String> {
        let id = channel.id;
        let mut state = lock(&channel.state);
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Close(close)) => {
                // A channel error is caused by what was asked on it
                // (NOT_FOUND, ACCESS_REFUSED…): the broker refused.
                let why = format!("{} {}", close.reply_code, close.reply_text.as_str());
                state.fail(BrokerError::Refused(why));
                let _ = self.send(|o| {
                    o.method(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                });
                // Crossed closes: ours is answered too, and the id is free
                // only once that answer came.
                if state.phase != Phase::Closing {
                    state.phase = Phase::Closed;
                    drop(state);
                    self.free(id);
                }
                return Ok(());
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(ok)) => {
                if state.phase != Phase::Closing {
                    drop(state);
                    self.abandon(channel, "the broker sent a close-ok for no close".into());
                    return Ok(());
                }
                if state.replies.front().is_some_and(|w| w.expects == (20, 41)) {
                    state.reply(AMQPClass::Channel(channel::AMQPMethod::CloseOk(ok)));
                }
                state.fail(BrokerError::Unavailable("channel closed".into()));
                state.phase = Phase::Closed;
                drop(state);
                self.free(id);
                return Ok(());
            }
            // Until its close-ok, a closing channel hears nothing else.
            _ if state.phase == Phase::Closing => return Ok(()),
            AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)) => {
                state.incoming = Some(Incoming::new(Some(deliver)));
            }
            AMQPClass::Basic(basic::AMQPMethod::Return(_)) => {
                state.incoming = Some(Incoming::new(None));
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                state.confirm(ack.delivery_tag, ack.multiple, true);
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => {
                state.confirm(nack.delivery_tag, nack.multiple, false);
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                // The broker cancelled a consumer (its queue was deleted).
                state.end_consumer(&cancel.consumer_tag);
                if !cancel.nowait {
                    let tag = cancel.consumer_tag;
                    let _ = self.send(|o| {
                        o.method(
                            id,
                            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                consumer_tag: tag,
                            })),
                        )
                    });
                }
            }
            AMQPClass::Channel(channel::AMQPMethod::Flow(flow)) => {
                channel.paused.store(!flow.active, Ordering::Relaxed);
                drop(state);
                let _ = self.send(|o| {
                    o.method(
                        id,
                        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                            active: flow.active,
                        })),
                    )
                });
                if flow.active {
                    self.drained.notify_waiters();
                }
                return Ok(());
            }
            reply => {
                let got = (reply.get_amqp_class_id(), reply.get_amqp_method_id());
                if state.replies.front().is_none_or(|w| w.expects != got) {
                    drop(state);
                    let why = format!("the broker sent a reply nobody asked for: {reply:?}");
                    self.abandon(channel, why);
                    return Ok(());
                }
                if let AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)) = &reply {
                    // Every delivery to the consumer came before this.
                    state.end_consumer(&ok.consumer_tag);
                }
                state.reply(reply);
            }
        }
        Ok(())
    }
}

impl ChannelState {
    pub(super) fn fail(&mut self, error: BrokerError) {
        if self.closed.is_none() {
            self.closed = Some(error.clone());
        }
        for reply in self.replies.drain(..) {
            let _ = reply.done.send(Err(error.clone()));
        }
        for pending in self.confirms.drain(..) {
            let _ = pending.done.send(Err(error.clone()));
        }
        self.incoming = None;
        self.wake();
    }

    pub(super) fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    pub(super) fn reply(&mut self, reply: AMQPClass) {
        if let Some(waiting) = self.replies.pop_front() {
            let _ = waiting.done.send(Ok(reply));
        }
    }

    pub(super) fn end_consumer(&mut self, tag: &ShortString) {
        if let Some(consumer) = self.consumers.iter_mut().find(|c| &c.tag == tag) {
            consumer.ended = true;
        }
        self.wake();
    }

    /// The broker confirmed (or refused) publish `seq`, or with `multiple`
    /// every one up to it. Confirms usually come in order, but need not.
    pub(super) fn confirm(&mut self, seq: u64, multiple: bool, ack: bool) {
        if multiple {
            while self.confirms.front().is_some_and(|p| p.seq <= seq) {
                if let Some(pending) = self.confirms.pop_front() {
                    self.settle(pending, ack);
                }
            }
        } else if let Ok(i) = self.confirms.binary_search_by_key(&seq, |p| p.seq) {
            if let Some(pending) = self.confirms.remove(i) {
                self.settle(pending, ack);
            }
        }
    }

    pub(super) fn settle(&mut self, pending: Pending, ack: bool) {
        let returned = self.returned.iter().position(|s| *s == pending.seq);
        if let Some(i) = returned {
            self.returned.swap_remove(i);
        }
        let result = match (ack, returned) {
            (true, None) => Confirmed::Routed,
            (true, Some(_)) => Confirmed::Unroutable,
            (false, _) => Confirmed::Nacked,
        };
        let _ = pending.done.send(Ok(result));
    }

    /// A deliver's or return's body is complete.
    pub(super) fn complete(&mut self) {
        let Some(incoming) = self.incoming.take() else {
            return;
        };
        let mut body = incoming.single.unwrap_or_else(|| incoming.body.freeze());
        if let Some(held) = incoming.held {
            // Released when the last copy of the body goes.
            body = Bytes::from_owner(HeldBody { body, _held: held });
        }
        let Some(deliver) = incoming.deliver else {
            if let Some(seq) = stamp_of(&incoming.properties) {
                self.returned.push(seq);
            }
            return;
        };
        let message = Message {
            delivery_tag: deliver.delivery_tag,
            redelivered: deliver.redelivered,
            exchange: deliver.exchange,
            routing_key: deliver.routing_key,
            properties: incoming.properties,
            body,
        };
        match self
            .consumers
            .iter_mut()
            .find(|c| c.tag == deliver.consumer_tag)
        {
            Some(consumer) => consumer.messages.push_back(message),
            None => {
                tracing::debug!(consumer = %deliver.consumer_tag.as_str(), "a delivery for no consumer")
            }
        }
        self.wake();
    }
}

impl Incoming {
    pub(super) fn new(deliver: Option<basic::Deliver>) -> Incoming {
        Incoming {
            deliver,
            properties: BasicProperties::default(),
            size: 0,
            body: BytesMut::new(),
            single: None,
            held: None,
        }
    }
}

/// Reads frames and hands them out until the connection ends, then fails
/// every channel with the reason. The broker is declared dead when
/// nothing at all came for two heart-beat intervals, whatever the writer
/// is doing: a write stuck on a frozen broker cannot hide it.
pub(super) async fn read_loop(
    inner: Arc<Inner>,
    mut reader: impl AsyncRead + Unpin,
    mut buf: BytesMut,
    heartbeat: Option<Duration>,
) {
    let silence = heartbeat.map(|h| h * 2);
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut deadline = silence.map_or(far, |s| tokio::time::Instant::now() + s);
    let mut by_gateway = false;
    let why = 'read: loop {
        loop {
            let mut dropped = 0;
            let parsed = parse_frame(&mut buf, inner.frame_max, &mut dropped);
            if dropped > 0 {
                inner.observer.lenient(dropped);
            }
            match parsed {
                Ok(Some(frame)) => {
                    if let Err(why) = inner.on_frame(frame) {
                        break 'read why;
                    }
                }
                Ok(None) => break,
                Err(why) => break 'read format!("the broker sent {why}"),
            }
        }
        buf.reserve(16 * 1024);
        // Each branch is cancel-safe: read_buf keeps what it read.
        let read = tokio::select! {
            read = reader.read_buf(&mut buf) => read,
            () = tokio::time::sleep_until(deadline), if silence.is_some() => {
                break format!(
                    "nothing from the broker for {:?}, two heart-beat intervals",
                    silence.unwrap_or_default()
                );
            }
            () = inner.stop.cancelled() => {
                if lock(&inner.failure).is_some() {
                    break "connection failed".to_owned();
                }
                // Dropped by the gateway: the writer says goodbye; the
                // broker's close-ok (or silence) ends the wait.
                by_gateway = true;
                let _ = tokio::time::timeout(CLOSE_WAIT, async {
                    loop {
                        match reader.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => buf.clear(),
                        }
                    }
                })
                .await;
                break 'read "connection closed by the gateway".to_owned();
            }
        };
        match read {
            Ok(0) => break "the broker closed the connection".to_owned(),
            Ok(_) => {
                if let Some(silence) = silence {
                    deadline = tokio::time::Instant::now() + silence;
                }
            }
            Err(e) => break format!("reading from the broker: {e}"),
        }
    };
    tracing::debug!(%why, "AMQP connection ended");
    inner.end(why, by_gateway);
}
