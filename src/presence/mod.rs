//! Presence (`/presence/<key>`): which sessions are subscribed to a key,
//! on every node, through RabbitMQ only: no registry, no new service.
//!
//! Each node runs one [`agent`] with a queue of its own, bound on
//! `amqp.direct_exchange`:
//!
//! - **Beats.** Every `presence.beat_interval` each agent says it is alive
//!   (`presence.beat`). A node not heard from for `presence.node_timeout`
//!   (killed, cut off) is gone, and every member it had leaves.
//! - **Watching.** A node where some session watches `<key>` binds
//!   `presence.event.<key>` and asks every node for its members
//!   (`presence.query`). Each answers to the asker alone
//!   (`presence.node.<id>`) and from then on publishes the key's joins and
//!   leaves, until the asker stops watching or is gone. A key nobody
//!   watches costs no message.
//! - **Snapshot.** A key's first watcher on a node gets its snapshot once
//!   every node it knows has answered (at most `presence.snapshot_timeout`);
//!   later ones get the node's table at once. Events that arrive meanwhile
//!   are in the table, so none is lost between snapshot and events.
//!
//! Joins and leaves say what is (this session is, or is not, a member of
//! this key); an answer says all of a node's members. Either can be
//! applied late or twice, so a node that lost messages (a reconnect, a
//! new watcher) is set right by asking again.
//!
//! Sessions touch only [`SessionPresence`]: their memberships, and their
//! watches, whose MESSAGEs reach them through their [`Inbox`].

pub mod agent;
mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::PresenceConfig;

/// Header on every presence MESSAGE: `snapshot`, `join` or `leave`.
pub const PRESENCE_HEADER: &str = "stompgate-presence";

/// Why a member left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// It unsubscribed from the key (its last subscription to it).
    Unsubscribe,
    /// Its connection ended, however: DISCONNECT, close, error, timeout.
    Disconnect,
    /// Its node stopped answering: killed, or cut off from the broker.
    NodeLost,
    /// Its node's answer to a new question no longer lists it: an event
    /// was lost on the way (a broker reconnect).
    Resync,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Unsubscribe => "unsubscribe",
            Reason::Disconnect => "disconnect",
            Reason::NodeLost => "node-lost",
            Reason::Resync => "resync",
        }
    }
}

/// A session's user as presence shows it: the authenticated one, as in
/// `stompgate-sender-user` (with auth.mode = "none", nobody's).
type User = Option<String>;

/// A MESSAGE for one of a session's presence subscriptions.
#[derive(Debug, Clone)]
pub struct PresenceMessage {
    pub subscription: String,
    pub destination: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

/// One session's presence MESSAGEs, waiting for it to write them.
pub struct Inbox {
    queue: Mutex<InboxQueue>,
    ready: Notify,
    max_pending: usize,
}

#[derive(Default)]
struct InboxQueue {
    messages: VecDeque<PresenceMessage>,
    /// More than `presence.max_pending` waited: the session is too slow.
    overflowed: bool,
}

/// The session did not write its presence MESSAGEs fast enough.
#[derive(Debug)]
pub struct Overflowed;

impl Inbox {
    fn new(max_pending: usize) -> Inbox {
        Inbox {
            queue: Mutex::default(),
            ready: Notify::new(),
            max_pending,
        }
    }

    fn push(&self, message: PresenceMessage) {
        {
            let mut queue = lock(&self.queue);
            if queue.overflowed {
                return;
            }
            if queue.messages.len() >= self.max_pending {
                queue.overflowed = true;
                queue.messages.clear();
            } else {
                queue.messages.push_back(message);
            }
        }
        self.ready.notify_one();
    }

    /// Resolves when something was pushed since the last [`Inbox::take`].
    /// Cancel-safe: a push while nobody waits is kept as a permit.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Everything waiting, oldest first.
    pub fn take(&self) -> Result<VecDeque<PresenceMessage>, Overflowed> {
        let mut queue = lock(&self.queue);
        if queue.overflowed {
            return Err(Overflowed);
        }
        Ok(std::mem::take(&mut queue.messages))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A session's subscription to `/presence/<key>`.
#[derive(Clone)]
struct Watcher {
    subscription: String,
    inbox: Arc<Inbox>,
}

impl Watcher {
    fn is(&self, subscription: &str, inbox: &Arc<Inbox>) -> bool {
        self.subscription == subscription && Arc::ptr_eq(&self.inbox, inbox)
    }
}

/// A key watched on this node: its members on every node, as far as
/// they are known, and the sessions watching.
struct Watch {
    /// Members by node: session → user.
    members: HashMap<String, HashMap<String, User>>,
    /// Members listed, all nodes together (at most presence.max_members).
    listed: usize,
    /// Nodes that have members this table leaves out (past
    /// presence.max_members, theirs or ours).
    truncated: HashSet<String>,
    /// The agent bound the key's events and asked every node: until then
    /// nothing is known.
    asked: bool,
    /// While the first snapshot is gathered: nodes yet to answer, and
    /// until when they are waited for.
    gathering: Option<(HashSet<String>, Instant)>,
    /// Watchers that have their snapshot, and get every change.
    watchers: Vec<Watcher>,
    /// Watchers waiting for the first snapshot.
    waiting: Vec<Watcher>,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            members: HashMap::new(),
            listed: 0,
            truncated: HashSet::new(),
            asked: false,
            gathering: None,
            watchers: Vec::new(),
            waiting: Vec::new(),
        }
    }

    fn synced(&self) -> bool {
        self.asked && self.gathering.is_none()
    }

    fn snapshot(&self, key: &str, subscription: &str) -> PresenceMessage {
        let mut members: Vec<(&String, &User)> =
            self.members.values().flat_map(|node| node.iter()).collect();
        members.sort();
        let truncated = !self.truncated.is_empty();
        let body = serde_json::json!({
            "presence": "snapshot",
            "key": key,
            "members": members
                .iter()
                .map(|(session, user)| serde_json::json!({"session": session, "user": user}))
                .collect::<Vec<_>>(),
            "truncated": truncated,
        });
        PresenceMessage {
            subscription: subscription.to_owned(),
            destination: format!("/presence/{key}"),
            headers: vec![
                (PRESENCE_HEADER, "snapshot".to_owned()),
                ("stompgate-presence-count", members.len().to_string()),
                ("stompgate-presence-truncated", truncated.to_string()),
                ("content-type", "application/json".to_owned()),
            ],
            body: Bytes::from(body.to_string()),
        }
    }

    /// Tells every watcher with a snapshot.
    fn tell(&self, key: &str, session: &str, user: &User, left: Option<Reason>) {
        if self.watchers.is_empty() {
            return;
        }
        let kind = if left.is_some() { "leave" } else { "join" };
        let mut body = serde_json::json!({
            "presence": kind,
            "key": key,
            "session": session,
            "user": user,
        });
        let mut headers = vec![
            (PRESENCE_HEADER, kind.to_owned()),
            ("stompgate-presence-session", session.to_owned()),
        ];
        if let Some(user) = user {
            headers.push(("stompgate-presence-user", user.clone()));
        }
        if let Some(reason) = left {
            body["reason"] = reason.as_str().into();
            headers.push(("stompgate-presence-reason", reason.as_str().to_owned()));
        }
        headers.push(("content-type", "application/json".to_owned()));
        let body = Bytes::from(body.to_string());
        for watcher in &self.watchers {
            watcher.inbox.push(PresenceMessage {
                subscription: watcher.subscription.clone(),
                destination: format!("/presence/{key}"),
                headers: headers.clone(),
                body: body.clone(),
            });
        }
    }

    /// `session` of `node` is a member; listed unless the table is full.
    fn join(&mut self, key: &str, node: &str, session: &str, user: User, max: usize) {
        let listed = self.members.get(node);
        if listed.is_some_and(|members| members.contains_key(session)) {
            return;
        }
        if self.listed >= max {
            self.truncated.insert(node.to_owned());
            return;
        }
        self.tell(key, session, &user, None);
        let members = self.members.entry(node.to_owned()).or_default();
        members.insert(session.to_owned(), user);
        self.listed += 1;
    }

    /// `session` of `node` is not a member (or was never listed).
    fn leave(&mut self, key: &str, node: &str, session: &str, reason: Reason) {
        let Some(members) = self.members.get_mut(node) else {
            return;
        };
        if let Some(user) = members.remove(session) {
            self.listed -= 1;
            self.tell(key, session, &user, Some(reason));
        }
    }

    /// Everything of `node` goes.
    fn forget(&mut self, key: &str, node: &str, reason: Reason) {
        self.truncated.remove(node);
        if let Some(members) = self.members.remove(node) {
            self.listed -= members.len();
            let mut members: Vec<_> = members.into_iter().collect();
            members.sort();
            for (session, user) in members {
                self.tell(key, &session, &user, Some(reason));
            }
        }
        if let Some((awaited, _)) = &mut self.gathering {
            awaited.remove(node);
        }
    }

    /// `node`'s answer: all its members (of which `truncated` says whether
    /// it left some out). What differs from the table is told as events.
    fn answered(
        &mut self,
        key: &str,
        node: &str,
        answer: Vec<(String, User)>,
        truncated: bool,
        max: usize,
    ) {
        let new: HashMap<String, User> = answer.into_iter().collect();
        let old = self.members.get(node).cloned().unwrap_or_default();
        let mut gone: Vec<&String> = old.keys().filter(|s| !new.contains_key(*s)).collect();
        gone.sort();
        for session in gone {
            self.leave(key, node, session, Reason::Resync);
        }
        self.truncated.remove(node);
        if truncated {
            self.truncated.insert(node.to_owned());
        }
        let mut came: Vec<(String, User)> = new
            .into_iter()
            .filter(|(s, _)| !old.contains_key(s))
            .collect();
        came.sort();
        for (session, user) in came {
            self.join(key, node, &session, user, max);
        }
        if let Some((awaited, _)) = &mut self.gathering {
            awaited.remove(node);
        }
    }

    /// Once every node answered (or `now` is past the wait), the waiting
    /// watchers get their snapshot and every change after it.
    fn settle(&mut self, key: &str, now: Instant) {
        let done = match &self.gathering {
            Some((awaited, until)) => awaited.is_empty() || *until <= now,
            None => self.asked,
        };
        if !done {
            return;
        }
        self.gathering = None;
        for watcher in std::mem::take(&mut self.waiting) {
            watcher
                .inbox
                .push(self.snapshot(key, &watcher.subscription));
            self.watchers.push(watcher);
        }
    }
}

/// A join or leave for the agent to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Join(User),
    Leave(Reason),
}

/// Changes waiting for the agent to publish them, in order. Bounded by
/// `presence.max_outbox`: past it (the broker holds the agent back) they
/// are dropped, and the agent says hello again instead, so that every
/// watching node asks this one and corrects its table from the answers.
#[derive(Default)]
struct Outbox {
    changes: VecDeque<(String, String, Change)>,
    overflowed: bool,
}

impl Outbox {
    fn push(&mut self, key: &str, session: &str, change: Change, max: usize) {
        if self.overflowed {
            return;
        }
        if self.changes.len() >= max {
            self.changes.clear();
            self.overflowed = true;
            return;
        }
        self.changes
            .push_back((key.to_owned(), session.to_owned(), change));
    }

    /// Everything waiting, and whether some was dropped.
    fn drain(&mut self) -> (Vec<(String, String, Change)>, bool) {
        let changes = self.changes.drain(..).collect();
        (changes, std::mem::take(&mut self.overflowed))
    }

    fn clear(&mut self) {
        self.changes.clear();
        self.overflowed = false;
    }
}

#[derive(Default)]
struct State {
    /// This node's members: key → session → user.
    local: HashMap<String, HashMap<String, User>>,
    /// Keys some node watches (this one too), and which nodes: only their
    /// changes are published.
    watched_by: HashMap<String, HashSet<String>>,
    outbox: Outbox,
    /// Keys watched on this node.
    watches: HashMap<String, Watch>,
    /// A watch began or ended since the agent last looked: only then does
    /// it go through them all.
    watches_changed: bool,
    /// Every node heard from, and when last.
    nodes: HashMap<String, Instant>,
}

/// The node's presence: its members, its watches, what other nodes are.
pub struct Presence {
    /// This process's node id on the wire: random, so that a restarted
    /// gateway is a new node and its old members leave.
    node: String,
    config: PresenceConfig,
    state: Mutex<State>,
    /// Wakes the agent: something to publish, bind or ask.
    wake: Notify,
}

impl Presence {
    pub fn new(config: &PresenceConfig) -> Arc<Presence> {
        Arc::new(Presence {
            node: format!("{:012x}", rand::random::<u64>() >> 16),
            config: config.clone(),
            state: Mutex::default(),
            wake: Notify::new(),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn joined(&self, key: &str, session: &str, user: &User) {
        let mut state = self.state();
        let members = state.local.entry(key.to_owned()).or_default();
        members.insert(session.to_owned(), user.clone());
        if state.watched_by.contains_key(key) {
            let max = self.config.max_outbox;
            state
                .outbox
                .push(key, session, Change::Join(user.clone()), max);
            self.wake.notify_one();
        }
    }

    /// `session` left every key of `keys`, all at once: a session that
    /// ends leaves its keys together.
    fn left<'k>(&self, keys: impl IntoIterator<Item = &'k String>, session: &str, reason: Reason) {
        let mut state = self.state();
        for key in keys {
            if let Some(members) = state.local.get_mut(key) {
                members.remove(session);
                if members.is_empty() {
                    state.local.remove(key);
                }
            }
            if state.watched_by.contains_key(key) {
                let max = self.config.max_outbox;
                state.outbox.push(key, session, Change::Leave(reason), max);
                self.wake.notify_one();
            }
        }
    }

    fn watch(&self, key: &str, watcher: Watcher) {
        let mut state = self.state();
        let watch = state
            .watches
            .entry(key.to_owned())
            .or_insert_with(Watch::new);
        if watch.synced() {
            watcher
                .inbox
                .push(watch.snapshot(key, &watcher.subscription));
            watch.watchers.push(watcher);
        } else {
            watch.waiting.push(watcher);
        }
        if !watch.asked {
            state.watches_changed = true;
            self.wake.notify_one();
        }
    }

    fn unwatch(&self, key: &str, subscription: &str, inbox: &Arc<Inbox>) {
        let mut state = self.state();
        let Some(watch) = state.watches.get_mut(key) else {
            return;
        };
        watch.watchers.retain(|w| !w.is(subscription, inbox));
        watch.waiting.retain(|w| !w.is(subscription, inbox));
        if watch.watchers.is_empty() && watch.waiting.is_empty() {
            state.watches.remove(key);
            // The agent unbinds it and tells the other nodes.
            state.watches_changed = true;
            self.wake.notify_one();
        }
    }
}

/// A session's part in presence: the keys it is a member of (sessions
/// subscribed to `/topic/<key>` or `/sub/<key>`, however many times) and
/// its `/presence/` subscriptions. Dropped with the session, whatever ends
/// it: its memberships leave and its watches go.
pub struct SessionPresence {
    presence: Option<Arc<Presence>>,
    session: String,
    user: User,
    keys: HashMap<String, usize>,
    /// Presence subscriptions: id → key.
    watching: HashMap<String, String>,
    pub inbox: Arc<Inbox>,
}

impl SessionPresence {
    /// `presence` is None when presence.enabled is off.
    pub fn new(
        presence: Option<Arc<Presence>>,
        session: &str,
        user: User,
        max_pending: usize,
    ) -> SessionPresence {
        SessionPresence {
            presence,
            session: session.to_owned(),
            user,
            keys: HashMap::new(),
            watching: HashMap::new(),
            inbox: Arc::new(Inbox::new(max_pending)),
        }
    }

    /// How many `/presence/` subscriptions the session has.
    pub fn watches(&self) -> usize {
        self.watching.len()
    }

    /// Whether subscription `id` is a `/presence/` one.
    pub fn watching(&self, id: &str) -> bool {
        self.watching.contains_key(id)
    }

    /// A subscription to `key`: the first makes the session a member.
    pub fn subscribed(&mut self, key: &str) {
        let count = self.keys.entry(key.to_owned()).or_insert(0);
        *count += 1;
        if let (1, Some(presence)) = (*count, &self.presence) {
            presence.joined(key, &self.session, &self.user);
        }
    }

    /// A subscription to `key` ended: the last one ends the membership.
    pub fn unsubscribed(&mut self, key: &str) {
        let Some(count) = self.keys.get_mut(key) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            let key = self.keys.remove_entry(key).map(|(key, _)| key);
            if let Some(presence) = &self.presence {
                presence.left(&key, &self.session, Reason::Unsubscribe);
            }
        }
    }

    /// Subscription `id` watches `key`: a snapshot, then every change.
    /// False when presence is off on this node.
    pub fn watch(&mut self, id: &str, key: &str) -> bool {
        let Some(presence) = &self.presence else {
            return false;
        };
        self.watching.insert(id.to_owned(), key.to_owned());
        let watcher = Watcher {
            subscription: id.to_owned(),
            inbox: self.inbox.clone(),
        };
        presence.watch(key, watcher);
        true
    }

    /// Ends subscription `id` if it is a presence one; false if not.
    pub fn unwatch(&mut self, id: &str) -> bool {
        let Some(key) = self.watching.remove(id) else {
            return false;
        };
        if let Some(presence) = &self.presence {
            presence.unwatch(&key, id, &self.inbox);
        }
        true
    }
}

impl Drop for SessionPresence {
    fn drop(&mut self) {
        let Some(presence) = &self.presence else {
            return;
        };
        presence.left(self.keys.keys(), &self.session, Reason::Disconnect);
        for (id, key) in &self.watching {
            presence.unwatch(key, id, &self.inbox);
        }
    }
}
