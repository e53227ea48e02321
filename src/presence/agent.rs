//! The node's presence agent: one task, and one queue of its own
//! (`stompgate.<node-id>.presence-<id>`) opened like a session's, through
//! the broker port. It beats, answers questions about this node's
//! members, publishes their changes for keys someone watches, and keeps
//! the watched keys' tables (see the module above for the design).
//!
//! Nothing waits for a publisher confirm: a lost message is set right by
//! asking again, which the agent does whenever it (or another node)
//! reconnects. When the broker is lost, the agent opens a new queue
//! every `presence.beat_interval` until it can.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::wire::{event_key, node_key, Said, BEATS, QUESTIONS};
use super::{Change, Presence, Reason};
use crate::broker::{Broker, BrokerError, BrokerSession, Delivery, Publish, Sender};
use crate::destination::Route;
use crate::metrics::Metrics;

/// The header that says a gateway published it (see `broker::amqp::headers`).
const SENDER_SESSION: &str = "stompgate-sender-session";

/// Runs until `stop` is cancelled (after the node's sessions have closed,
/// so that their leaves go first), then says bye.
pub async fn run<B: Broker>(
    presence: Arc<Presence>,
    broker: B,
    direct_exchange: String,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let name = format!("presence-{}", presence.node);
    let retry = presence.config.beat_interval;
    let mut failures = 0u32;
    loop {
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = broker.open(&name, false) => opened,
        };
        match opened {
            Ok(session) => {
                if failures > 0 {
                    info!(node = %presence.node, "presence has the broker again");
                }
                failures = 0;
                let mut agent = Agent {
                    presence: presence.clone(),
                    sender: Arc::new(Sender {
                        session: presence.node.clone(),
                        user: None,
                    }),
                    exchange: direct_exchange.clone(),
                    metrics: metrics.clone(),
                    session,
                    bound: Default::default(),
                    hello: true,
                    next_beat: Instant::now(),
                    snapshots_due: Vec::new(),
                };
                match agent.serve(&stop).await {
                    Ok(()) => return agent.goodbye().await,
                    Err(error) => {
                        warn!(%error, "presence lost the broker; opening its queue again")
                    }
                }
            }
            Err(error) => {
                if failures == 0 {
                    warn!(%error, "presence cannot open its queue; retrying every presence.beat_interval");
                }
                failures += 1;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

struct Agent<S> {
    presence: Arc<Presence>,
    /// On everything it publishes: readers trust only what a gateway's
    /// AMQP user published.
    sender: Arc<Sender>,
    exchange: String,
    metrics: Arc<Metrics>,
    session: S,
    /// Watched keys whose events this queue is bound to.
    bound: std::collections::HashSet<String>,
    /// The next beat is the first on this queue.
    hello: bool,
    next_beat: Instant,
    /// When snapshot waits end, for those not over yet.
    snapshots_due: Vec<Instant>,
}

impl<S: BrokerSession> Agent<S> {
    async fn serve(&mut self, stop: &CancellationToken) -> Result<(), BrokerError> {
        let own = node_key(&self.presence.node);
        for key in [BEATS, QUESTIONS, own.as_str()] {
            let route = self.route(key);
            self.session.bind(&route).await?;
        }
        self.presence.reconnected();
        loop {
            self.flush().await?;
            let due = self.next_due();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                delivery = self.session.next_delivery() => match delivery {
                    Some(Ok(delivery)) => self.heard(delivery).await?,
                    Some(Err(error)) => return Err(error),
                    None => {
                        return Err(BrokerError::Unavailable(
                            "the broker cancelled presence's consumer".into(),
                        ))
                    }
                },
                () = self.presence.wake.notified() => {}
                () = tokio::time::sleep_until(due) => self.tick().await?,
            }
        }
    }

    fn route(&self, key: &str) -> Route {
        Route {
            exchange: self.exchange.clone(),
            key: key.to_owned(),
        }
    }

    async fn say(&mut self, key: &str, said: &Said) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(said).map_err(|e| BrokerError::Invalid(e.to_string()))?;
        let publish = Publish {
            route: self.route(key),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body),
            sender: Some(self.sender.clone()),
        };
        // The confirm is not awaited: see the module's header.
        let _confirm = self.session.publish(&publish).await?;
        self.metrics
            .presence_published
            .with_label_values(&[said.op()])
            .inc();
        Ok(())
    }

    /// Publishes what sessions changed, and binds, asks about or lets go
    /// of the keys watched here.
    async fn flush(&mut self) -> Result<(), BrokerError> {
        let me = self.presence.node.clone();
        let (asks, drops, (changes, overflowed)) = {
            let mut state = self.presence.state();
            let now = Instant::now();
            let until = now + self.presence.config.snapshot_timeout;
            let mut known: std::collections::HashSet<String> =
                state.nodes.keys().cloned().collect();
            known.insert(me.clone());
            let (mut asks, mut drops) = (Vec::new(), Vec::new());
            if std::mem::take(&mut state.watches_changed) {
                for (key, watch) in state.watches.iter_mut().filter(|(_, w)| !w.asked) {
                    watch.asked = true;
                    watch.gathering = Some((known.clone(), until));
                    asks.push(key.clone());
                }
                drops = self
                    .bound
                    .iter()
                    .filter(|k| !state.watches.contains_key(*k))
                    .cloned()
                    .collect();
            }
            if !asks.is_empty() {
                self.snapshots_due.push(until);
            }
            (asks, drops, state.outbox.drain())
        };
        if overflowed {
            // Changes were dropped: every watching node asks again.
            warn!(
                max = self.presence.config.max_outbox,
                "presence changes came faster than they could be published \
                 (presence.max_outbox): the other nodes are asked to ask again"
            );
            self.metrics.presence_outbox_overflows.inc();
            self.hello = true;
            self.next_beat = Instant::now();
            // This node's own watches were told nothing either.
            self.greet(&me).await?;
        }
        for key in asks {
            // Bound before asking: whatever a node publishes after its
            // answer reaches this queue.
            if self.bound.insert(key.clone()) {
                let route = self.route(&event_key(&key));
                self.session.bind(&route).await?;
            }
            let query = Said::Query {
                node: me.clone(),
                key,
            };
            self.say(QUESTIONS, &query).await?;
        }
        for key in drops {
            self.bound.remove(&key);
            let route = self.route(&event_key(&key));
            self.session.unbind(&route).await?;
            let unwatch = Said::Unwatch {
                node: me.clone(),
                key,
            };
            self.say(QUESTIONS, &unwatch).await?;
        }
        for (key, session, change) in changes {
            let said = match change {
                Change::Join(user) => Said::Join {
                    node: me.clone(),
                    key: key.clone(),
                    session,
                    user,
                },
                Change::Leave(reason) => Said::Leave {
                    node: me.clone(),
                    key: key.clone(),
                    session,
                    reason,
                },
            };
            self.say(&event_key(&key), &said).await?;
        }
        Ok(())
    }

    /// The next beat, or the end of a snapshot's wait.
    fn next_due(&self) -> Instant {
        self.snapshots_due
            .iter()
            .copied()
            .fold(self.next_beat, Instant::min)
    }

    /// Beats when it is time, lets nodes not heard from go, and ends
    /// snapshot waits that are over.
    async fn tick(&mut self) -> Result<(), BrokerError> {
        let now = Instant::now();
        if self.next_beat <= now {
            let beat = Said::Beat {
                node: self.presence.node.clone(),
                hello: std::mem::take(&mut self.hello),
            };
            self.say(BEATS, &beat).await?;
            self.next_beat = now + self.presence.config.beat_interval;
            let timeout = self.presence.config.node_timeout;
            let gone: Vec<String> = {
                let state = self.presence.state();
                state
                    .nodes
                    .iter()
                    .filter(|(node, heard)| {
                        **node != self.presence.node && now.duration_since(**heard) > timeout
                    })
                    .map(|(node, _)| node.clone())
                    .collect()
            };
            for node in gone {
                info!(%node, ?timeout, "a node was not heard from for presence.node_timeout: its members leave");
                self.presence.lost(&node);
            }
            let nodes = self.presence.state().nodes.len();
            self.metrics.presence_nodes.set(nodes as i64);
        }
        self.snapshots_due.retain(|until| *until > now);
        let mut state = self.presence.state();
        for (key, watch) in state.watches.iter_mut() {
            watch.settle(key, now);
        }
        Ok(())
    }

    /// A message on the agent's queue.
    async fn heard(&mut self, delivery: Delivery) -> Result<(), BrokerError> {
        let said = match serde_json::from_slice::<Said>(&delivery.body) {
            Ok(said) => said,
            Err(error) => {
                debug!(%error, key = delivery.routing_key, "not a presence message: ignored");
                return Ok(());
            }
        };
        // Only a gateway's AMQP user can publish with this header, and
        // each agent's names itself.
        let vouched = delivery
            .headers
            .iter()
            .any(|(name, value)| name == SENDER_SESSION && value == said.node());
        if !vouched {
            debug!(
                key = delivery.routing_key,
                "a presence message no gateway published: ignored"
            );
            return Ok(());
        }
        let me = self.presence.node.clone();
        let node = said.node().to_owned();
        let max = self.presence.config.max_members;
        let now = Instant::now();
        let new = {
            let mut state = self.presence.state();
            let new = state.nodes.insert(node.clone(), now).is_none();
            self.metrics.presence_nodes.set(state.nodes.len() as i64);
            new
        };
        let hello = matches!(said, Said::Beat { hello: true, .. });
        if (new || hello) && node != me {
            self.greet(&node).await?;
        }
        match said {
            Said::Beat { .. } => {}
            Said::Bye { node } => {
                if node != me {
                    self.presence.lost(&node);
                    let nodes = self.presence.state().nodes.len();
                    self.metrics.presence_nodes.set(nodes as i64);
                }
            }
            Said::Query { node: asker, key } => {
                let answer = {
                    let mut state = self.presence.state();
                    state
                        .watched_by
                        .entry(key.clone())
                        .or_default()
                        .insert(asker.clone());
                    let members = state.local.get(&key);
                    let listed: Vec<_> = members
                        .into_iter()
                        .flatten()
                        .take(max)
                        .map(|(s, u)| (s.clone(), u.clone()))
                        .collect();
                    let truncated = members.is_some_and(|m| m.len() > max);
                    Said::Answer {
                        node: me,
                        key,
                        members: listed,
                        truncated,
                    }
                };
                self.say(&node_key(&asker), &answer).await?;
            }
            Said::Unwatch { node: asker, key } => {
                let mut state = self.presence.state();
                if let Some(nodes) = state.watched_by.get_mut(&key) {
                    nodes.remove(&asker);
                    if nodes.is_empty() {
                        state.watched_by.remove(&key);
                    }
                }
            }
            Said::Answer {
                node,
                key,
                members,
                truncated,
            } => {
                let mut state = self.presence.state();
                if let Some(watch) = state.watches.get_mut(&key) {
                    watch.answered(&key, &node, members, truncated, max);
                    watch.settle(&key, now);
                }
            }
            Said::Join {
                node,
                key,
                session,
                user,
            } => {
                let mut state = self.presence.state();
                if let Some(watch) = state.watches.get_mut(&key) {
                    watch.join(&key, &node, &session, user, max);
                }
            }
            Said::Leave {
                node,
                key,
                session,
                reason,
            } => {
                let mut state = self.presence.state();
                if let Some(watch) = state.watches.get_mut(&key) {
                    watch.leave(&key, &node, &session, reason);
                }
            }
        }
        Ok(())
    }

    /// A node this one did not know, or one that just (re)connected: it
    /// hears from this node at once, and is asked about every key watched
    /// here.
    async fn greet(&mut self, node: &str) -> Result<(), BrokerError> {
        let me = self.presence.node.clone();
        let to = node_key(node);
        let beat = Said::Beat {
            node: me.clone(),
            hello: false,
        };
        self.say(&to, &beat).await?;
        let watched: Vec<String> = {
            let state = self.presence.state();
            state
                .watches
                .iter()
                .filter(|(_, w)| w.asked)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in watched {
            let query = Said::Query {
                node: me.clone(),
                key,
            };
            self.say(&to, &query).await?;
        }
        Ok(())
    }

    /// The node is stopping: what its sessions changed goes out, then
    /// bye, so that other nodes need not wait for its timeout.
    async fn goodbye(mut self) {
        let said = async {
            self.flush().await?;
            let bye = Said::Bye {
                node: self.presence.node.clone(),
            };
            self.say(BEATS, &bye).await
        };
        if let Err(error) = said.await {
            debug!(%error, "presence could not say bye");
        }
        self.session.close().await;
    }
}

impl Presence {
    /// The agent has a new queue: what was heard before is not lost with
    /// it, but the clocks of other nodes start again (they could not be
    /// heard meanwhile), pending changes are dropped (answers to the new
    /// questions carry them) and every watched key is asked about again.
    fn reconnected(&self) {
        let mut state = self.state();
        let now = Instant::now();
        for heard in state.nodes.values_mut() {
            *heard = now;
        }
        state.outbox.clear();
        for watch in state.watches.values_mut() {
            watch.asked = false;
        }
        state.watches_changed = true;
    }

    /// `node` is gone: its members leave, its watches end.
    fn lost(&self, node: &str) {
        let mut state = self.state();
        state.nodes.remove(node);
        for (key, watch) in state.watches.iter_mut() {
            watch.forget(key, node, Reason::NodeLost);
        }
        state.watched_by.retain(|_, nodes| {
            nodes.remove(node);
            !nodes.is_empty()
        });
        let now = Instant::now();
        for (key, watch) in state.watches.iter_mut() {
            watch.settle(key, now);
        }
    }
}
