//! The operator's list of live sessions behind `GET /admin/sessions`: who
//! is connected, from where, on which RabbitMQ queue, reading what.
//!
//! Sessions register once at CONNECTED and leave when they end; per-message
//! counters are atomics on the session's own entry, so the hot path never
//! takes the registry's lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<SessionEntry>>>,
}

/// What a session tells the registry about itself.
pub struct SessionEntry {
    pub id: String,
    pub peer: String,
    /// CONNECT's `login`, as the client stated it.
    pub user: Option<String>,
    pub version: &'static str,
    pub queue: String,
    pub connected_since: SystemTime,
    /// (subscription id, destination), in SUBSCRIBE order.
    subscriptions: Mutex<Vec<(String, String)>>,
    /// SEND frames received.
    pub messages_in: AtomicU64,
    /// MESSAGE frames sent.
    pub messages_out: AtomicU64,
}

impl SessionEntry {
    pub fn new(
        id: &str,
        peer: &str,
        user: Option<String>,
        version: &'static str,
        queue: &str,
    ) -> SessionEntry {
        SessionEntry {
            id: id.to_owned(),
            peer: peer.to_owned(),
            user,
            version,
            queue: queue.to_owned(),
            connected_since: SystemTime::now(),
            subscriptions: Mutex::new(Vec::new()),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
        }
    }

    pub fn subscribed(&self, id: &str, destination: &str) {
        lock(&self.subscriptions).push((id.to_owned(), destination.to_owned()));
    }

    pub fn unsubscribed(&self, id: &str) {
        lock(&self.subscriptions).retain(|(s, _)| s != id);
    }
}

/// A poisoned lock only means another thread panicked mid-update of a
/// plain list; the data is still usable for an operator's view.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the session from the registry when dropped, however it ends.
pub struct Registration {
    registry: Arc<Registry>,
    id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry.sessions).remove(&self.id);
    }
}

#[derive(Serialize)]
pub struct SessionView {
    pub session: String,
    pub peer: String,
    pub user: Option<String>,
    pub version: &'static str,
    pub queue: String,
    /// Seconds since the Unix epoch.
    pub connected_since: u64,
    pub subscriptions: Vec<SubscriptionView>,
    pub messages_in: u64,
    pub messages_out: u64,
}

#[derive(Serialize)]
pub struct SubscriptionView {
    pub id: String,
    pub destination: String,
}

impl Registry {
    pub fn register(self: &Arc<Self>, entry: Arc<SessionEntry>) -> Registration {
        let id = entry.id.clone();
        lock(&self.sessions).insert(id.clone(), entry);
        Registration {
            registry: self.clone(),
            id,
        }
    }

    /// Every live session, oldest first.
    pub fn snapshot(&self) -> Vec<SessionView> {
        let entries: Vec<Arc<SessionEntry>> = lock(&self.sessions).values().cloned().collect();
        let mut views: Vec<SessionView> = entries
            .iter()
            .map(|e| SessionView {
                session: e.id.clone(),
                peer: e.peer.clone(),
                user: e.user.clone(),
                version: e.version,
                queue: e.queue.clone(),
                connected_since: e
                    .connected_since
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                subscriptions: lock(&e.subscriptions)
                    .iter()
                    .map(|(id, destination)| SubscriptionView {
                        id: id.clone(),
                        destination: destination.clone(),
                    })
                    .collect(),
                messages_in: e.messages_in.load(Ordering::Relaxed),
                messages_out: e.messages_out.load(Ordering::Relaxed),
            })
            .collect();
        views.sort_by_key(|v| v.connected_since);
        views
    }
}
