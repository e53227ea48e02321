//! Acknowledgements: which MESSAGEs wait for the client's ACK, what an
//! ACK or NACK settles (`client` mode is cumulative per subscription),
//! when a delivery can be acked to RabbitMQ (all its MESSAGEs settled),
//! and the acks of auto-mode deliveries held back to go as one `multiple`
//! ack. Bookkeeping only: each event returns what to tell the broker.

use std::collections::HashMap;

use tokio::time::Instant;
use tracing::debug;

use crate::broker::{Broker, BrokerSession};
use crate::stomp::command::AckMode;

use super::subscriptions::Subscriptions;
use super::{End, Session, SessionError};

/// What the session must tell the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ToBroker {
    /// Ack delivery `tag` (and every earlier one when `multiple`):
    /// `count` deliveries.
    Ack {
        tag: u64,
        multiple: bool,
        count: u64,
    },
    /// Return delivery `tag` to the queue.
    Requeue { tag: u64 },
}

#[derive(Clone, Copy)]
struct HeldAcks {
    tag: u64,
    count: u64,
    since: Instant,
}

pub(super) struct Acks {
    /// Message number → (subscription id, delivery tag) for MESSAGEs that
    /// wait for the client's ACK.
    unacked: HashMap<u64, (String, u64)>,
    /// Delivery tag → MESSAGEs of that delivery still waiting for an ACK;
    /// the delivery is acked to RabbitMQ when this reaches zero.
    awaiting: HashMap<u64, usize>,
    /// Deliveries settled without a client ACK (auto mode) whose ack to
    /// RabbitMQ is held back, to go as one `multiple` ack: the highest
    /// tag, how many, and since when. Held only while no delivery waits
    /// for a client ACK, so a `multiple` ack never covers one.
    held: Option<HeldAcks>,
    /// Most acks held back before they go anyway.
    batch: u64,
}

impl Acks {
    pub(super) fn new(batch: u64) -> Acks {
        Acks {
            unacked: HashMap::new(),
            awaiting: HashMap::new(),
            held: None,
            batch: batch.max(1),
        }
    }

    /// MESSAGE `number` of subscription `subscription` waits for an ACK
    /// of delivery `tag`.
    pub(super) fn awaits(&mut self, number: u64, subscription: &str, tag: u64) {
        self.unacked.insert(number, (subscription.to_owned(), tag));
    }

    /// Delivery `tag` was written as MESSAGEs, `awaiting` of which wait for
    /// the client: what goes to the broker now (at most two acks).
    pub(super) fn delivered(
        &mut self,
        tag: u64,
        awaiting: usize,
        now: Instant,
    ) -> impl Iterator<Item = ToBroker> {
        let mut out = [None, None];
        if awaiting > 0 {
            self.awaiting.insert(tag, awaiting);
        } else if self.awaiting.is_empty() {
            // Auto mode (or a message for a subscription that has just
            // gone): written to the socket, so done.
            let held = self.held.get_or_insert(HeldAcks {
                tag,
                count: 0,
                since: now,
            });
            held.tag = tag;
            held.count += 1;
            if held.count >= self.batch {
                out[0] = self.release();
            }
        } else {
            // Deliveries wait for client ACKs: a `multiple` ack would
            // cover them, so this one goes alone.
            out[0] = self.release();
            out[1] = Some(ToBroker::Ack {
                tag,
                multiple: false,
                count: 1,
            });
        }
        out.into_iter().flatten()
    }

    /// The acks held back, as one.
    pub(super) fn release(&mut self) -> Option<ToBroker> {
        self.held.take().map(|held| ToBroker::Ack {
            tag: held.tag,
            multiple: true,
            count: held.count,
        })
    }

    /// When the held acks must go (see `ACK_DELAY`).
    pub(super) fn held_since(&self) -> Option<Instant> {
        self.held.map(|h| h.since)
    }

    /// ACK (`positive`) or NACK of the MESSAGE whose `ack` header was `id`.
    pub(super) fn acknowledge(
        &mut self,
        id: &str,
        positive: bool,
        subscriptions: &mut Subscriptions,
    ) -> Result<Vec<ToBroker>, SessionError> {
        let Ok(number) = id.parse::<u64>() else {
            return Err(SessionError::Protocol(format!(
                "ACK/NACK names no message of this session: {id:?}"
            )));
        };
        // An id already settled (e.g. covered by an earlier cumulative
        // ACK, or gone with the broker) is not an error: clients may ACK
        // every message anyway.
        let Some((subscription_id, _)) = self.unacked.get(&number) else {
            debug!(number, "ACK/NACK of a message already settled");
            return Ok(Vec::new());
        };
        let Some(subscription) = subscriptions.find_mut(subscription_id) else {
            return Ok(Vec::new());
        };
        let numbers: Vec<u64> = match subscription.ack {
            AckMode::Client => {
                let upto = subscription
                    .unacked
                    .iter()
                    .position(|&n| n == number)
                    .map_or(0, |p| p + 1);
                subscription.unacked.drain(..upto).collect()
            }
            _ => {
                subscription.unacked.retain(|&n| n != number);
                vec![number]
            }
        };
        Ok(self.settle_all(numbers, positive, subscriptions))
    }

    /// MESSAGEs the client never acked on a subscription it left are
    /// settled as consumed: requeueing them would redeliver them to the
    /// connection's other subscriptions.
    pub(super) fn unsubscribed(
        &mut self,
        unacked: impl IntoIterator<Item = u64>,
        subscriptions: &mut Subscriptions,
    ) -> Vec<ToBroker> {
        self.settle_all(unacked, true, subscriptions)
    }

    fn settle_all(
        &mut self,
        numbers: impl IntoIterator<Item = u64>,
        positive: bool,
        subscriptions: &mut Subscriptions,
    ) -> Vec<ToBroker> {
        let mut out = Vec::new();
        for number in numbers {
            if let Some((_, tag)) = self.unacked.remove(&number) {
                out.extend(self.settle_message(tag, positive, subscriptions));
            }
        }
        out
    }

    /// One MESSAGE of delivery `tag` settled by the client. The delivery is
    /// acked once all its MESSAGEs are; a NACK of any returns it to the
    /// queue at once, and its other MESSAGEs no longer wait.
    fn settle_message(
        &mut self,
        tag: u64,
        positive: bool,
        subscriptions: &mut Subscriptions,
    ) -> Option<ToBroker> {
        let remaining = self.awaiting.get_mut(&tag)?;
        if positive {
            *remaining -= 1;
            if *remaining > 0 {
                return None;
            }
            self.awaiting.remove(&tag);
            return Some(ToBroker::Ack {
                tag,
                multiple: false,
                count: 1,
            });
        }
        self.awaiting.remove(&tag);
        let orphans: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, (_, t))| *t == tag)
            .map(|(n, _)| *n)
            .collect();
        for number in orphans {
            if let Some((subscription_id, _)) = self.unacked.remove(&number) {
                if let Some(s) = subscriptions.find_mut(&subscription_id) {
                    s.unacked.retain(|&n| n != number);
                }
            }
        }
        Some(ToBroker::Requeue { tag })
    }

    /// The broker was lost: its deliveries went with the queue.
    pub(super) fn lost(&mut self) {
        self.unacked.clear();
        self.awaiting.clear();
        self.held = None;
    }
}

impl<B: Broker> Session<B> {
    /// ACK (`positive`) or NACK of the MESSAGE whose `ack` header was `id`.
    pub(super) async fn acknowledge(
        &mut self,
        id: &str,
        positive: bool,
    ) -> Result<(), SessionError> {
        let out = self
            .acks
            .acknowledge(id, positive, &mut self.subscriptions)?;
        for action in out {
            self.tell_broker(action).await?;
        }
        Ok(())
    }

    /// Sends the acks held back by [`Acks::delivered`] as one.
    pub(super) async fn release_acks(&mut self) -> Result<(), End> {
        match self.acks.release() {
            Some(action) => self.tell_broker_or_fail(action).await,
            None => Ok(()),
        }
    }

    /// [`Session::tell_broker`], ending the session if the broker refused.
    pub(super) async fn tell_broker_or_fail(&mut self, action: ToBroker) -> Result<(), End> {
        match self.tell_broker(action).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e, None).await),
        }
    }

    /// Acks or requeues a delivery, and counts it; nothing while the
    /// broker is away (its deliveries went with it).
    pub(super) async fn tell_broker(&mut self, action: ToBroker) -> Result<(), SessionError> {
        let Some(broker) = self.broker.as_mut() else {
            return Ok(());
        };
        let result = match action {
            ToBroker::Ack { tag, multiple, .. } => broker.ack(tag, multiple).await,
            ToBroker::Requeue { tag } => broker.nack(tag, true).await,
        };
        if self.check(result).await?.is_some() {
            match action {
                ToBroker::Ack { count, .. } => self.metrics.deliveries_acked.inc_by(count),
                ToBroker::Requeue { .. } => self.metrics.deliveries_requeued.inc(),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::{Destination, Use};
    use crate::session::subscriptions::Subscription;

    fn subscriptions(modes: &[(&str, AckMode)]) -> Subscriptions {
        let mut subs = Subscriptions::default();
        for (id, mode) in modes {
            let destination = Destination::parse("/topic/x", Use::Subscribe, "amq.topic").unwrap();
            subs.add(Subscription::new((*id).into(), destination, *mode));
        }
        subs
    }

    /// Delivery `tag` as MESSAGE `number` on each of `on`, as the session
    /// writes it.
    fn deliver(acks: &mut Acks, subs: &mut Subscriptions, tag: u64, sent: &[(&str, u64)]) {
        for (id, number) in sent {
            subs.find_mut(id).unwrap().unacked.push_back(*number);
            acks.awaits(*number, id, tag);
        }
        let out: Vec<_> = acks.delivered(tag, sent.len(), Instant::now()).collect();
        assert!(out.is_empty(), "{out:?}");
    }

    fn ack(tag: u64) -> ToBroker {
        ToBroker::Ack {
            tag,
            multiple: false,
            count: 1,
        }
    }

    #[test]
    fn client_acks_are_cumulative_per_subscription_only() {
        let mut subs = subscriptions(&[("a", AckMode::Client), ("b", AckMode::Client)]);
        let mut acks = Acks::new(10);
        // Deliveries 1..=3, each to both subscriptions: numbers 1..=6.
        for tag in 1..=3 {
            deliver(
                &mut acks,
                &mut subs,
                tag,
                &[("a", tag * 2 - 1), ("b", tag * 2)],
            );
        }
        // ACK of a's third covers a's first two, not b's: no delivery is
        // done while b still waits.
        let out = acks.acknowledge("5", true, &mut subs).unwrap();
        assert!(out.is_empty(), "{out:?}");
        assert!(subs.find_mut("a").unwrap().unacked.is_empty());
        assert_eq!(subs.find_mut("b").unwrap().unacked.len(), 3);
        // b's second: deliveries 1 and 2 are now settled everywhere.
        let out = acks.acknowledge("4", true, &mut subs).unwrap();
        assert_eq!(out, [ack(1), ack(2)]);
        // Already settled: not an error, nothing to do.
        assert!(acks.acknowledge("1", true, &mut subs).unwrap().is_empty());
        assert!(matches!(
            acks.acknowledge("nonsense", true, &mut subs),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn a_nack_requeues_the_delivery_and_its_other_messages_stop_waiting() {
        let mut subs = subscriptions(&[
            ("a", AckMode::ClientIndividual),
            ("b", AckMode::ClientIndividual),
        ]);
        let mut acks = Acks::new(10);
        deliver(&mut acks, &mut subs, 7, &[("a", 1), ("b", 2)]);
        deliver(&mut acks, &mut subs, 8, &[("a", 3)]);
        let out = acks.acknowledge("1", false, &mut subs).unwrap();
        assert_eq!(out, [ToBroker::Requeue { tag: 7 }]);
        assert_eq!(subs.find_mut("b").unwrap().unacked.len(), 0);
        assert!(acks.acknowledge("2", true, &mut subs).unwrap().is_empty());
        // Individual: only the one named.
        assert_eq!(acks.acknowledge("3", true, &mut subs).unwrap(), [ack(8)]);
    }

    #[test]
    fn held_acks_never_cover_a_delivery_that_waits_for_the_client() {
        let mut subs = subscriptions(&[("auto", AckMode::Auto), ("c", AckMode::Client)]);
        let mut acks = Acks::new(3);
        let now = Instant::now();
        // Auto deliveries are held, and go as one at the batch size.
        assert_eq!(acks.delivered(1, 0, now).count(), 0);
        assert_eq!(acks.delivered(2, 0, now).count(), 0);
        assert_eq!(acks.held_since(), Some(now));
        let out: Vec<_> = acks.delivered(3, 0, now).collect();
        assert_eq!(
            out,
            [ToBroker::Ack {
                tag: 3,
                multiple: true,
                count: 3
            }]
        );
        assert_eq!(acks.held_since(), None);
        acks.delivered(4, 0, now).for_each(drop);
        // Delivery 5 waits for the client; 6 comes without: the held one
        // goes first, and 6 alone, so no `multiple` ack covers 5.
        deliver(&mut acks, &mut subs, 5, &[("c", 1)]);
        let out: Vec<_> = acks.delivered(6, 0, now).collect();
        assert_eq!(
            out,
            [
                ToBroker::Ack {
                    tag: 4,
                    multiple: true,
                    count: 1
                },
                ack(6)
            ]
        );
        assert_eq!(acks.release(), None);
        // Leaving the subscription settles what it never acked.
        let (left, _) = subs.remove("c").unwrap();
        assert_eq!(acks.unsubscribed(left.unacked, &mut subs), [ack(5)]);
    }

    #[test]
    fn losing_the_broker_forgets_its_deliveries() {
        let mut subs = subscriptions(&[("c", AckMode::Client)]);
        let mut acks = Acks::new(10);
        deliver(&mut acks, &mut subs, 1, &[("c", 1)]);
        acks.delivered(2, 0, Instant::now()).for_each(drop);
        acks.lost();
        subs.mark_gap();
        assert!(acks.acknowledge("1", true, &mut subs).unwrap().is_empty());
        assert_eq!(acks.release(), None);
    }
}
