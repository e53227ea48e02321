//! The session's subscriptions: the table in SUBSCRIBE order, how many
//! subscriptions share each binding of the queue, and which of them a
//! delivery is for. Bookkeeping only: the session makes the bindings it
//! is told to make.

use std::collections::{HashMap, VecDeque};

use tracing::debug;

use crate::broker::{Broker, BrokerSession};
use crate::destination::{
    address_word, presence_key, session_route, topic_matches, user_inbox, user_route, Destination,
    Route, Use,
};
use crate::stomp::command::AckMode;

use super::{denied_by_grants, Session, SessionError};

pub(super) struct Subscription {
    pub(super) id: String,
    pub(super) destination: Destination,
    /// A second binding that brings it messages: a `/user/queue/<name>`
    /// subscription gets its user's as well as its session's.
    pub(super) also: Option<Route>,
    /// MESSAGEs name `destination.prefix` alone (`/user/queue/<name>`),
    /// not prefix and routing key.
    pub(super) exact: bool,
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
            also: None,
            exact: false,
            ack,
            unacked: VecDeque::new(),
            gap: false,
        }
    }

    /// A subscription to `/user/queue/<name>`: its session's messages for
    /// `name` and, with a user, that user's.
    pub(super) fn addressed(
        id: String,
        shown_as: &str,
        session: Route,
        user: Option<Route>,
        ack: AckMode,
    ) -> Subscription {
        let destination = Destination {
            prefix: shown_as.to_owned(),
            route: session,
        };
        Subscription {
            also: user,
            exact: true,
            ..Subscription::new(id, destination, ack)
        }
    }

    /// Every binding it needs.
    pub(super) fn routes(&self) -> impl Iterator<Item = &Route> {
        std::iter::once(&self.destination.route).chain(&self.also)
    }

    /// Whether a delivery from `exchange` with `routing_key` is for it.
    pub(super) fn matches(&self, exchange: &str, routing_key: &str) -> bool {
        let route = &self.destination.route;
        if route.exchange == exchange && topic_matches(&route.key, routing_key) {
            return true;
        }
        // Addressed keys have no wildcards: equal or not.
        self.also
            .as_ref()
            .is_some_and(|r| r.exchange == exchange && r.key == routing_key)
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

    /// Refuses an id already in use, or one subscription more than `limit`;
    /// `others` are the session's subscriptions kept elsewhere (presence).
    pub(super) fn check_new(
        &self,
        id: &str,
        others: (usize, bool),
        limit: usize,
    ) -> Result<(), SessionError> {
        let (other_count, other_has_id) = others;
        if other_has_id || self.list.iter().any(|s| s.id == id) {
            return Err(SessionError::Protocol(format!(
                "subscription id {id:?} is already in use on this connection"
            )));
        }
        if self.list.len() + other_count >= limit {
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
        for route in subscription.routes() {
            *self.bindings.entry(route.clone()).or_insert(0) += 1;
        }
        self.list.push(subscription);
    }

    /// Takes subscription `id` out, with the bindings it was the last to
    /// use (which should go then).
    pub(super) fn remove(&mut self, id: &str) -> Result<(Subscription, Vec<Route>), SessionError> {
        let Some(index) = self.list.iter().position(|s| s.id == id) else {
            return Err(SessionError::Protocol(format!(
                "no subscription with id {id:?}"
            )));
        };
        let subscription = self.list.remove(index);
        let mut unused = Vec::new();
        for route in subscription.routes() {
            match self.bindings.get_mut(route) {
                Some(users) if *users > 1 => *users -= 1,
                _ => {
                    self.bindings.remove(route);
                    unused.push(route.clone());
                }
            }
        }
        Ok((subscription, unused))
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
        let others = (self.presence.watches(), self.presence.watching(&id));
        self.subscriptions
            .check_new(&id, others, self.config.stomp.max_subscriptions)?;
        let destination_name = destination;
        if let Some(key) = presence_key(destination) {
            return self.watch(id, destination, key?, ack);
        }
        let subscription = match user_inbox(destination_name) {
            // The session's own inbox for addressed messages: no grant
            // needed, nothing of anyone else's.
            Some(inbox) => {
                let inbox = inbox?;
                let name = inbox.as_str();
                let direct = &self.config.amqp.direct_exchange;
                let user = match self.user.as_deref() {
                    Some(user) => Some(user_route(
                        direct,
                        address_word(destination_name, user).map_err(|_| {
                            SessionError::Protocol(format!(
                                "user {user:?} cannot be addressed: a name with '.', '*', '#' \
                                 or '/' (or over 100 bytes) has no /user/ destinations"
                            ))
                        })?,
                        name,
                    )),
                    None => None,
                };
                let session = session_route(direct, &self.id, name);
                Subscription::addressed(id, destination_name, session, user, ack)
            }
            None => {
                let destination =
                    Destination::parse(destination, Use::Subscribe, &self.config.amqp.exchange)?;
                self.check_exchange(&destination)?;
                if !self.grants.may_subscribe(&destination.route) {
                    return Err(denied_by_grants(Use::Subscribe, destination_name));
                }
                Subscription::new(id, destination, ack)
            }
        };
        if ack.needs_ack() {
            // What came without acks was meant for the subscriptions
            // made before this one, and goes to them first.
            if let Err(end) = Box::pin(self.require_acks("client_ack", None)).await {
                self.ended = Some(end);
                return Ok(());
            }
        }
        // While reconnecting, the bindings are made when the queue is back.
        let new: Vec<Route> = subscription
            .routes()
            .filter(|r| self.subscriptions.needs_binding(r))
            .cloned()
            .collect();
        for route in &new {
            if let Some(broker) = self.broker.as_mut() {
                let result = broker.bind(route).await;
                self.check(result).await?;
            }
        }
        debug!(id = subscription.id, destination = ?subscription.destination.route, "subscribed");
        self.metrics.subscriptions.inc();
        self.entry.subscribed(&subscription.id, destination_name);
        if let Some(key) = self.member_key(&subscription.destination) {
            self.presence.subscribed(&key);
        }
        self.subscriptions.add(subscription);
        Ok(())
    }

    /// The key a subscription makes the session a member of, for
    /// `/presence/<key>`: one routing key (no wildcard) on the exchange
    /// behind `/topic/` and `/sub/`.
    fn member_key(&self, destination: &Destination) -> Option<String> {
        let route = &destination.route;
        let literal = !route.key.split('.').any(|w| w == "*" || w == "#");
        (route.exchange == self.config.amqp.exchange && literal).then(|| route.key.clone())
    }

    pub(super) async fn unsubscribe(&mut self, id: &str) -> Result<(), SessionError> {
        if self.presence.unwatch(id) {
            self.metrics.subscriptions.dec();
            self.entry.unsubscribed(id);
            return Ok(());
        }
        let (subscription, unused) = self.subscriptions.remove(id)?;
        self.metrics.subscriptions.dec();
        self.entry.unsubscribed(id);
        if let Some(key) = self.member_key(&subscription.destination) {
            self.presence.unsubscribed(&key);
        }
        let settled = self
            .acks
            .unsubscribed(subscription.unacked, &mut self.subscriptions);
        for action in settled {
            self.tell_broker(action).await?;
        }
        for route in &unused {
            if let Some(broker) = self.broker.as_mut() {
                let result = broker.unbind(route).await;
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
        let (gone, unused) = subs.remove("a").unwrap();
        assert_eq!(gone.id, "a");
        assert!(unused.is_empty());
        assert!(!subs.needs_binding(&route));
        let (_, unused) = subs.remove("c").unwrap();
        assert_eq!(unused, vec![route.clone()]);
        assert!(subs.needs_binding(&route));
        assert_eq!(subs.routes().count(), 1);
    }

    #[test]
    fn ids_are_unique_and_the_table_is_bounded() {
        let mut subs = Subscriptions::default();
        subs.add(subscription("a", "/topic/x"));
        let Err(SessionError::Protocol(why)) = subs.check_new("a", (0, false), 10) else {
            panic!("a reused id is refused");
        };
        assert!(why.contains("already in use"), "{why}");
        let Err(SessionError::Limit { key, .. }) = subs.check_new("b", (0, false), 1) else {
            panic!("one more than the limit is refused");
        };
        assert_eq!(key, "stomp.max_subscriptions");
        assert!(subs.check_new("b", (0, false), 2).is_ok());
        assert!(matches!(
            subs.remove("nope"),
            Err(SessionError::Protocol(_))
        ));
        // Another exchange's delivery with the same key is not for it.
        assert!(!subs.get(0).matches("other", "x"));
    }

    #[test]
    fn an_inbox_is_bound_for_its_session_and_its_user() {
        let mut subs = Subscriptions::default();
        let session = session_route("d", "s1", "inbox");
        let user = user_route("d", "ann", "inbox");
        let inbox = Subscription::addressed(
            "in".into(),
            "/user/queue/inbox",
            session.clone(),
            Some(user.clone()),
            AckMode::Auto,
        );
        assert!(inbox.exact);
        subs.add(inbox);
        // Ann's second inbox subscription shares the user binding.
        subs.add(Subscription::addressed(
            "in2".into(),
            "/user/queue/inbox",
            session_route("d", "s1", "inbox"),
            Some(user.clone()),
            AckMode::Auto,
        ));
        assert_eq!(subs.routes().count(), 2);
        let inbox = subs.get(0);
        assert!(inbox.matches("d", "session.s1.inbox"));
        assert!(inbox.matches("d", "user.ann.inbox"));
        assert!(!inbox.matches("d", "user.bob.inbox"));
        assert!(!inbox.matches("amq.topic", "user.ann.inbox"));
        let (_, unused) = subs.remove("in").unwrap();
        assert!(unused.is_empty());
        let (_, mut unused) = subs.remove("in2").unwrap();
        unused.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(unused, vec![session, user]);
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
