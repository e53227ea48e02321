//! Bytes of deliveries held in the gateway, per channel and for the node:
//! the rule that overruns the channel of a session that does not keep
//! up, and the sweep that applies it to sessions that stopped coming.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::broker::BrokerError;
use crate::budget::{Budget, Held};

use super::{lock, ChannelShared, Inner, Phase};

/// A session that has not come for deliveries for this long, holding
/// more than [`Holding::per_channel`], is not keeping up: a session that
/// is, even in a burst, comes back at once.
pub(super) const STALLED: Duration = Duration::from_millis(250);
/// The same for a session holding more than [`Holding::floor`] while the
/// node is over its budget: longer, as a node short of memory may be
/// short of CPU too, and a session only slow to be scheduled is not
/// stuck.
pub(super) const NODE_STALLED: Duration = Duration::from_secs(1);
/// The config key of [`Holding::node`].
pub(super) const NODE_LIMIT: &str = "amqp.node_prefetch_bytes";

/// How many bytes of deliveries the gateway may hold, counted from their
/// content header until the last copy of their body is dropped (the
/// session has written them to its client). RabbitMQ's prefetch counts
/// messages only, and a consumer without acks has none: this is the bound
/// in bytes. A delivery that would take a channel whose session has not
/// come for deliveries for `STALLED` past `per_channel` (or any channel
/// past twice that), unless the channel holds nothing (one message of
/// any size may pass), or one past `floor` while the node is over its
/// `node` budget and the session has not come for `NODE_STALLED`, overruns
/// the channel: its deliveries are dropped, the broker is told to close
/// it, and its calls and takes fail with [`BrokerError::Overrun`].
#[derive(Clone)]
pub struct Holding {
    pub per_channel: usize,
    pub floor: usize,
    pub node: Arc<Budget>,
}

impl Holding {
    /// Charges a delivery of `size` bytes to `channel`, or says why it
    /// overruns the channel.
    pub(super) fn admit(
        &self,
        channel: &ChannelShared,
        size: usize,
        idle: Duration,
    ) -> Result<Held, BrokerError> {
        let held = channel.held.load(Ordering::Relaxed);
        let after = held.saturating_add(size);
        // A session that keeps coming for deliveries is writing them to a
        // client that reads: what it holds passes (a burst without acks,
        // republished SENDs after an outage), up to twice the bound.
        let past = after > self.per_channel && (idle > STALLED || after > self.per_channel * 2);
        if held > 0 && past {
            return Err(BrokerError::Overrun {
                limit: "amqp.prefetch_bytes",
                detail: format!(
                    "the session holds {held} bytes of deliveries its client has not read, \
                     and the next ({size} bytes) would take it past amqp.prefetch_bytes ({})",
                    self.per_channel
                ),
            });
        }
        if held > self.floor && self.node.over() && idle > NODE_STALLED {
            return Err(self.node_overrun(held));
        }
        Ok(self.node.charge(size, Some(channel.held.clone())))
    }

    pub(super) fn node_overrun(&self, held: usize) -> BrokerError {
        BrokerError::Overrun {
            limit: NODE_LIMIT,
            detail: format!(
                "the node holds more than amqp.node_prefetch_bytes ({}) of deliveries, \
                 and this session {held} bytes its client has not read for {NODE_STALLED:?}",
                self.node.limit()
            ),
        }
    }
}

/// A delivery's body with its charge, released with the body.
pub(super) struct HeldBody {
    pub(super) body: Bytes,
    pub(super) _held: Held,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// While the node is over its budget of deliveries, ends the channels
/// that hold more than the floor and whose session has stalled: in a
/// window of acked deliveries nothing new comes that would overrun them.
pub(super) async fn sweep_loop(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(NODE_STALLED / 4).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.stop.is_cancelled() {
            return;
        }
        let Some(holding) = inner.holding.as_ref().filter(|h| h.node.over()) else {
            continue;
        };
        let channels: Vec<Arc<ChannelShared>> = lock(&inner.channels)
            .slots
            .iter()
            .flatten()
            .cloned()
            .collect();
        for channel in channels {
            let held = channel.held.load(Ordering::Relaxed);
            let stalled = {
                let state = lock(&channel.state);
                state.phase == Phase::Open
                    && state.last_take.is_none_or(|t| t.elapsed() > NODE_STALLED)
            };
            if stalled && held > holding.floor && holding.node.over() {
                inner.overrun(&channel, holding.node_overrun(held));
                channel.cut.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Mutex;

    use prometheus::IntGauge;
    use tokio_util::sync::CancellationToken;

    use super::*;

    fn channel() -> ChannelShared {
        ChannelShared {
            id: 1,
            state: Mutex::default(),
            paused: AtomicBool::new(false),
            held: Arc::new(AtomicUsize::new(0)),
            cut: CancellationToken::new(),
        }
    }

    fn holding(node: usize) -> Holding {
        Holding {
            per_channel: 1000,
            floor: 100,
            node: Budget::new(node, IntGauge::new("held", "held").unwrap()),
        }
    }

    fn limit(result: Result<Held, BrokerError>) -> &'static str {
        match result {
            Err(BrokerError::Overrun { limit, .. }) => limit,
            Err(other) => panic!("not an overrun: {other}"),
            Ok(_) => panic!("admitted"),
        }
    }

    #[test]
    fn a_session_that_keeps_coming_may_hold_up_to_twice_its_bound() {
        let holding = holding(1 << 20);
        let channel = channel();
        let busy = Duration::from_millis(10);
        // One message of any size passes an empty channel.
        let first = holding.admit(&channel, 5000, STALLED * 4).unwrap();
        assert_eq!(channel.held.load(Ordering::Relaxed), 5000);
        drop(first);
        assert_eq!(channel.held.load(Ordering::Relaxed), 0);
        let mut held = vec![holding.admit(&channel, 600, busy).unwrap()];
        // Past the bound while coming for deliveries: passes...
        held.push(holding.admit(&channel, 600, busy).unwrap());
        // ...but not past twice the bound, nor past it once stalled.
        assert_eq!(
            limit(holding.admit(&channel, 900, busy)),
            "amqp.prefetch_bytes"
        );
        assert_eq!(
            limit(holding.admit(&channel, 10, STALLED * 2)),
            "amqp.prefetch_bytes"
        );
        assert_eq!(holding.node.held(), 1200);
        drop(held);
        assert_eq!(holding.node.held(), 0);
    }

    #[test]
    fn past_the_node_budget_stalled_sessions_above_the_floor_go() {
        let holding = holding(300);
        let (stuck, other) = (channel(), channel());
        let _a = holding.admit(&stuck, 200, Duration::ZERO).unwrap();
        let _b = holding.admit(&other, 200, Duration::ZERO).unwrap();
        assert!(holding.node.over());
        // Over the node's budget: a session that came recently passes.
        let _c = holding
            .admit(&stuck, 10, Duration::from_millis(10))
            .unwrap();
        assert_eq!(
            limit(holding.admit(&stuck, 10, NODE_STALLED * 2)),
            NODE_LIMIT
        );
        // One holding no more than the floor passes, stalled or not.
        let small = channel();
        let _d = holding.admit(&small, 50, NODE_STALLED * 2).unwrap();
        let _e = holding.admit(&small, 50, NODE_STALLED * 2).unwrap();
    }
}
