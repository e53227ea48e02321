//! The data path out: a delivery from the session's queue becomes one
//! MESSAGE per matching subscription, written in a batch; a session on
//! the fast path (no acks to RabbitMQ) moves for good to acked
//! consumption with a prefetch when its client falls behind, so the
//! backlog stays in RabbitMQ and not in the gateway.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use crate::broker::{Broker, BrokerError, BrokerSession, Delivery};
use crate::stomp::frame::FrameWriter;

use super::{End, Session, GAP_HEADER};

/// See [`Session::keep_up`].
const SLOW_SOCKET_GRACE: Duration = Duration::from_millis(100);

/// The next delivery of the session's queue, or never while the broker is
/// being reconnected. Cancel-safe, like `BrokerSession::next_delivery`.
pub(super) async fn next_delivery<S: BrokerSession>(
    broker: &mut Option<S>,
) -> Option<Result<Delivery, BrokerError>> {
    match broker {
        Some(broker) => broker.next_delivery().await,
        None => std::future::pending().await,
    }
}

impl<B: Broker> Session<B> {
    /// What the queue gave: a delivery, which on the fast path may first
    /// move the session to acks (see [`Session::slowing_for`]); or the
    /// consumer's end, which is the broker's loss.
    pub(super) async fn queue_gave(
        &mut self,
        delivery: Option<Result<Delivery, BrokerError>>,
    ) -> Result<(), End> {
        let error = match delivery {
            Some(Ok(delivery)) => {
                return match self.slowing_for(delivery.body.len()).await? {
                    Some(reason) => Box::pin(self.require_acks(reason, Some(delivery))).await,
                    None => self.deliver(delivery).await,
                };
            }
            Some(Err(e)) => e,
            None => BrokerError::Unavailable("the broker cancelled the session's consumer".into()),
        };
        match self.check(Err::<(), _>(error)).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(e, None).await),
        }
    }

    /// Sends a delivery as one MESSAGE per matching subscription.
    async fn deliver(&mut self, delivery: Delivery) -> Result<(), End> {
        self.metrics.deliveries.inc();
        // One queue receives a message once even when several bindings
        // match it, so the session fans it out to its subscriptions.
        let mut awaiting = 0;
        // The MESSAGE's bytes, near enough for one allocation: 160 covers
        // the headers the session adds (ids, destination prefix, ack,
        // redelivered, gap, content-length) for ordinary ids and prefixes.
        let size_hint = 160
            + delivery.routing_key.len()
            + delivery
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>()
            + delivery.body.len();
        // By index: writing a MESSAGE needs `self` while a subscription is
        // borrowed, and collecting the matches would allocate per delivery.
        for index in 0..self.subscriptions.len() {
            if !self
                .subscriptions
                .get(index)
                .matches(&delivery.exchange, &delivery.routing_key)
            {
                continue;
            }
            let number = self.next_message;
            self.next_message += 1;
            let subscription = self.subscriptions.get_mut(index);
            let mut frame = FrameWriter::new("MESSAGE", self.conn.escapes, size_hint);
            frame.header("subscription", &subscription.id);
            frame.header_number("message-id", number);
            if subscription.exact {
                frame.header("destination", &subscription.destination.prefix);
            } else {
                frame.header_parts(
                    "destination",
                    &[&subscription.destination.prefix, &delivery.routing_key],
                );
            }
            if subscription.ack.needs_ack() && !delivery.settled {
                frame.header_number("ack", number);
                subscription.unacked.push_back(number);
                self.acks.awaits(number, &subscription.id, delivery.tag);
                awaiting += 1;
            }
            if delivery.redelivered {
                frame.header("redelivered", "true");
            }
            if std::mem::take(&mut subscription.gap) {
                // The first MESSAGE after a broker outage: what was
                // published during it may not have reached this queue.
                frame.header(GAP_HEADER, "true");
            }
            for (name, value) in &delivery.headers {
                frame.header(name, value);
            }
            self.conn
                .write_message(frame.finish(&delivery.body))
                .await?;
            self.metrics.messages_delivered.inc();
            self.entry.messages_out.fetch_add(1, Ordering::Relaxed);
        }
        if delivery.settled {
            return Ok(());
        }
        for action in self.acks.delivered(delivery.tag, awaiting, Instant::now()) {
            self.tell_broker_or_fail(action).await?;
        }
        Ok(())
    }

    /// Why a session on the fast path must move to acked consumption now,
    /// if it must: it fell a prefetch behind, or a write would wait for
    /// the client. Either way deliveries would pile up in the gateway,
    /// where nothing bounds them; with acks RabbitMQ holds them.
    async fn slowing(&mut self) -> Result<Option<&'static str>, End> {
        self.slowing_for(0).await
    }

    /// [`Session::slowing`], for a delivery of `body` bytes: one larger
    /// than `amqp.no_ack_max_body` moves the session to acks too, as a
    /// session that must slow down can find a few hundred deliveries
    /// already on their way without acks.
    async fn slowing_for(&mut self, body: usize) -> Result<Option<&'static str>, End> {
        let Some(broker) = self.broker.as_ref().filter(|b| !b.acks()) else {
            return Ok(None);
        };
        if broker.behind() {
            return Ok(Some("backlog"));
        }
        if body > self.config.amqp.no_ack_max_body {
            return Ok(Some("large_message"));
        }
        Ok(self.conn.backed_up().await?.then_some("slow_socket"))
    }

    /// Before a write that may wait for the client: see [`Session::slowing`].
    /// On the fast path, what is buffered must also go within
    /// SLOW_SOCKET_GRACE: a client that stopped reading mid-batch (less
    /// than FLUSH_BYTES buffered, which the per-delivery check leaves be)
    /// would otherwise hold the session in the flush that follows for up
    /// to stomp.slow_client_timeout, deliveries piling up behind it
    /// without acks. A client only a moment behind stays on the fast path.
    pub(super) async fn keep_up(&mut self) -> Result<(), End> {
        let mut reason = self.slowing().await?;
        let fast = self.broker.as_ref().is_some_and(|b| !b.acks());
        if reason.is_none()
            && fast
            && self.conn.unflushed > 0
            && !self.conn.flush_within(SLOW_SOCKET_GRACE).await?
        {
            reason = Some("slow_socket");
        }
        match reason {
            Some(reason) => Box::pin(self.require_acks(reason, None)).await,
            None => Ok(()),
        }
    }

    /// Moves the session from the fast path (deliveries without acks) to
    /// acked consumption with a prefetch, for good, then delivers `first`
    /// and what had come without acks, in order.
    ///
    /// Callers box its future: it runs at most once per session, and its
    /// 2 KB, held inline, would be part of every session's task.
    pub(super) async fn require_acks(
        &mut self,
        reason: &'static str,
        first: Option<Delivery>,
    ) -> Result<(), End> {
        self.acked = true;
        let mut early = Vec::new();
        if let Some(broker) = self.broker.as_mut().filter(|b| !b.acks()) {
            self.metrics
                .acked_consumption
                .with_label_values(&[reason])
                .inc();
            let result = broker.require_acks().await;
            match self.check(result).await {
                Ok(taken) => early = taken.unwrap_or_default(),
                Err(e) => return Err(self.fail(e, None).await),
            }
            debug!(
                reason,
                early = early.len(),
                "consuming with acks from now on"
            );
        }
        for delivery in first.into_iter().chain(early) {
            self.deliver(delivery).await?;
        }
        Ok(())
    }
}
