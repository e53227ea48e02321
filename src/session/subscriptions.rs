//! The session's subscriptions: the table in SUBSCRIBE order, how many
//! subscriptions share each binding of the queue, and which of them a
//! delivery is for. Bookkeeping only: the session makes the bindings it
//! is told to make.

use std::collections::{HashMap, VecDeque};

use tracing::debug;

use crate::broker::{Broker, BrokerSession};
use crate::destination::{topic_matches, Destination, Route, Use};
use crate::stomp::command::AckMode;

use super::{denied_by_grants, Session, SessionError};

pub(super) struct Subscription {
    pub(super) id: String,
    pub(super) destination: Destination,
    pub(super) ack: AckMode,
    /// Message numbers sent on this subscription and not yet acked, oldest
    /// first (a `client`-mode ACK covers every earlier one).
    pub(super) unacked: VecDeque<u64>,
    /// Set when the broker was lost: the next MESSAGE carries the gap header.
    pub(super) gap: bool,
}

impl Subscription {
    pub(super) fn new(id: String, destination: Destination, ack: AckMode) -> Subscription {
        Subscription {
            id,
            destination,
            ack,
            unacked: VecDeque::new(),
            gap: false,
        }
    }

    /// Whether a delivery from `exchange` with `routing_key` is for it.
    pub(super) fn matches(&self, exchange: &str, routing_key: &str) -> bool {
        let route = &self.destination.route;
        route.exchange == exchange && topic_matches(&route.key, routing_key)
    }
}

#[derive(Default)]
pub(super) struct Subscriptions {
    /// In SUBSCRIBE order, so a delivery matching several subscriptions
    /// produces its MESSAGE frames in a stable order.
    list: Vec<Subscription>,
    /// How many subscriptions use each binding: two subscriptions with
    /// the same route share one binding on the queue.
    bindings: HashMap<Route, usize>,
}

impl Subscriptions {
    pub(super) fn len(&self) -> usize {
        self.list.len()
    }

    /// Refuses an id already in use, or one subscription more than `limit`.
    pub(super) fn check_new(&self, id: &str, limit: usize) -> Result<(), SessionError> {
        if self.list.iter().any(|s| s.id == id) {
            return Err(SessionError::Protocol(format!(
                "subscription id {id:?} is already in use on this connection"
            )));
        }
        if self.list.len() >= limit {
            return Err(SessionError::Limit {
                key: "stomp.max_subscriptions",
                detail: format!("more than stomp.max_subscriptions ({limit}) subscriptions"),
            });
        }
        Ok(())
    }

    /// Whether subscribing to `route` needs a new binding on the queue.
    pub(super) fn needs_binding(&self, route: &Route) -> bool {
        !self.bindings.contains_key(route)
    }

    pub(super) fn add(&mut self, subscription: Subscription) {
        let route = subscription.destination.route.clone();
        *self.bindings.entry(route).or_insert(0) += 1;
        self.list.push(subscription);
    }

    /// Takes subscription `id` out, with whether it was the last to use
    /// its binding (which should go then).
    pub(super) fn remove(&mut self, id: &str) -> Result<(Subscription, bool), SessionError> {
        let Some(index) = self.list.iter().position(|s| s.id == id) else {
            return Err(SessionError::Protocol(format!(
                "no subscription with id {id:?}"
            )));
        };
        let subscription = self.list.remove(index);
        let route = &subscription.destination.route;
        let last_user = match self.bindings.get_mut(route) {
            Some(users) if *users > 1 => {
                *users -= 1;
                false
            }
            _ => {
                self.bindings.remove(route);
                true
            }
        };
        Ok((subscription, last_user))
    }

    /// The bindings the queue needs, one per route.
    pub(super) fn routes(&self) -> impl Iterator<Item = &Route> {
        self.bindings.keys()
    }

    /// By index: writing a MESSAGE needs the session while a subscription
    /// is borrowed, and collecting the matches would allocate per delivery.
    pub(super) fn get_mut(&mut self, index: usize) -> &mut Subscription {
        &mut self.list[index]
    }

    pub(super) fn get(&self, index: usize) -> &Subscription {
        &self.list[index]
    }

    pub(super) fn find_mut(&mut self, id: &str) -> Option<&mut Subscription> {
        self.list.iter_mut().find(|s| s.id == id)
    }

    /// The broker was lost: what was unacked went with the queue, and
    /// each subscription's next MESSAGE carries the gap header.
    pub(super) fn mark_gap(&mut self) {
        for subscription in &mut self.list {
            subscription.unacked.clear();
            subscription.gap = true;
        }
    }
}

impl<B: Broker> Session<B> {
    pub(super) async fn subscribe(
        &mut self,
        id: String,
        destination: &str,
        ack: AckMode,
    ) -> Result<(), SessionError> {
        self.subscriptions
            .check_new(&id, self.config.stomp.max_subscriptions)?;
        let destination_name = destination;
        let destination =
            Destination::parse(destination, Use::Subscribe, &self.config.amqp.exchange)?;
        self.check_exchange(&destination)?;
        if !self.grants.may_subscribe(&destination.route) {
            return Err(denied_by_grants(Use::Subscribe, destination_name));
        }
        if ack.needs_ack() {
            // What came without acks was meant for the subscriptions
            // made before this one, and goes to them first.
            if let Err(end) = self.require_acks("client_ack", None).await {
                self.ended = Some(end);
                return Ok(());
            }
        }
        // While reconnecting, the binding is made when the queue is back.
        if self.subscriptions.needs_binding(&destination.route) {
            if let Some(broker) = self.broker.as_mut() {
                let result = broker.bind(&destination.route).await;
                self.check(result).await?;
            }
        }
        debug!(id, destination = ?destination.route, "subscribed");
        self.metrics.subscriptions.inc();
        self.entry.subscribed(&id, destination_name);
        self.subscriptions
            .add(Subscription::new(id, destination, ack));
        Ok(())
    }

    pub(super) async fn unsubscribe(&mut self, id: &str) -> Result<(), SessionError> {
        let (subscription, last_user) = self.subscriptions.remove(id)?;
        self.metrics.subscriptions.dec();
        self.entry.unsubscribed(id);
        let settled = self
            .acks
            .unsubscribed(subscription.unacked, &mut self.subscriptions);
        for action in settled {
            self.tell_broker(action).await?;
        }
        if last_user {
            if let Some(broker) = self.broker.as_mut() {
                let result = broker.unbind(&subscription.destination.route).await;
                self.check(result).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::Use;

    fn subscription(id: &str, destination: &str) -> Subscription {
        let destination = Destination::parse(destination, Use::Subscribe, "amq.topic").unwrap();
        Subscription::new(id.into(), destination, AckMode::Auto)
    }

    fn matching(subs: &Subscriptions, key: &str) -> Vec<String> {
        (0..subs.len())
            .map(|i| subs.get(i))
            .filter(|s| s.matches("amq.topic", key))
            .map(|s| s.id.clone())
            .collect()
    }

    #[test]
    fn overlapping_subscriptions_share_a_binding_and_match_in_order() {
        let mut subs = Subscriptions::default();
        let first = subscription("a", "/topic/news.*");
        let route = first.destination.route.clone();
        assert!(subs.needs_binding(&route));
        subs.add(first);
        assert!(!subs.needs_binding(&route));
        subs.add(subscription("b", "/topic/news.#"));
        subs.add(subscription("c", "/topic/news.*"));
        assert_eq!(subs.routes().count(), 2);
        assert_eq!(matching(&subs, "news.sport"), ["a", "b", "c"]);
        assert_eq!(matching(&subs, "news.sport.today"), ["b"]);
        // The binding stays while another subscription uses it.
        let (gone, last) = subs.remove("a").unwrap();
        assert_eq!(gone.id, "a");
        assert!(!last);
        assert!(!subs.needs_binding(&route));
        let (_, last) = subs.remove("c").unwrap();
        assert!(last);
        assert!(subs.needs_binding(&route));
        assert_eq!(subs.routes().count(), 1);
    }

    #[test]
    fn ids_are_unique_and_the_table_is_bounded() {
        let mut subs = Subscriptions::default();
        subs.add(subscription("a", "/topic/x"));
        let Err(SessionError::Protocol(why)) = subs.check_new("a", 10) else {
            panic!("a reused id is refused");
        };
        assert!(why.contains("already in use"), "{why}");
        let Err(SessionError::Limit { key, .. }) = subs.check_new("b", 1) else {
            panic!("one more than the limit is refused");
        };
        assert_eq!(key, "stomp.max_subscriptions");
        assert!(subs.check_new("b", 2).is_ok());
        assert!(matches!(
            subs.remove("nope"),
            Err(SessionError::Protocol(_))
        ));
        // Another exchange's delivery with the same key is not for it.
        assert!(!subs.get(0).matches("other", "x"));
    }

    #[test]
    fn losing_the_broker_marks_a_gap_and_forgets_what_was_unacked() {
        let mut subs = Subscriptions::default();
        subs.add(subscription("a", "/topic/x"));
        subs.get_mut(0).unacked.extend([1, 2]);
        subs.mark_gap();
        let a = subs.find_mut("a").unwrap();
        assert!(a.gap);
        assert!(a.unacked.is_empty());
    }
}
