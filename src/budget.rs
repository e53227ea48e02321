//! Bytes the node holds for its clients, counted against node-wide
//! budgets: deliveries on their way to clients (`amqp.node_prefetch_bytes`)
//! and what clients sent that is not published yet, partial frames and
//! messages and open transactions (`stomp.node_inbound_bytes`).
//!
//! Per-session limits bound one client; these bound many clients together
//! (up to `server.max_connections_per_ip` of them from one address).
//! Past a budget the node pushes back on whoever holds the most: a
//! session holding deliveries beyond a small floor is ended as too slow,
//! one holding client bytes beyond it is not read until the node is back
//! under budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::Notify;

/// Bytes charged against a limit, from anywhere in the node.
pub struct Budget {
    held: AtomicUsize,
    limit: usize,
    /// `stompgate_held_bytes{held=…}`: `held`, for operators.
    gauge: IntGauge,
    /// Told when `held` falls back to the limit or below.
    below: Notify,
}

impl Budget {
    pub fn new(limit: usize, gauge: IntGauge) -> Arc<Budget> {
        Arc::new(Budget {
            held: AtomicUsize::new(0),
            limit,
            gauge,
            below: Notify::new(),
        })
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn over(&self) -> bool {
        self.held() > self.limit
    }

    /// Charges `bytes` until the returned [`Held`] is dropped; `also`
    /// counts them too (a session's own total).
    pub fn charge(self: &Arc<Self>, bytes: usize, also: Option<Arc<AtomicUsize>>) -> Held {
        self.add(bytes);
        if let Some(also) = &also {
            also.fetch_add(bytes, Ordering::Relaxed);
        }
        Held {
            budget: self.clone(),
            bytes,
            also,
        }
    }

    /// An amount charged from now on, changed with [`Account::set`].
    pub fn account(self: &Arc<Self>) -> Account {
        Account {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Waits until the node is at or under its limit.
    pub async fn until_below(&self) {
        loop {
            let notified = self.below.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release in between wakes it.
            notified.as_mut().enable();
            if !self.over() {
                return;
            }
            notified.await;
        }
    }

    fn add(&self, bytes: usize) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        self.gauge.add(bytes as i64);
    }

    fn sub(&self, bytes: usize) {
        self.gauge.sub(bytes as i64);
        let before = self.held.fetch_sub(bytes, Ordering::Relaxed);
        if before > self.limit && before - bytes <= self.limit {
            self.below.notify_waiters();
        }
    }
}

/// Bytes charged to a [`Budget`] (and to a session's own count) until
/// dropped.
pub struct Held {
    budget: Arc<Budget>,
    bytes: usize,
    also: Option<Arc<AtomicUsize>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.sub(self.bytes);
        if let Some(also) = &self.also {
            also.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// A varying amount charged to a [`Budget`]: what one client has sent
/// that is not yet published.
pub struct Account {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Account {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Charges `bytes` in place of what was charged before.
    pub fn set(&mut self, bytes: usize) {
        if bytes > self.bytes {
            self.budget.add(bytes - self.bytes);
        } else if bytes < self.bytes {
            self.budget.sub(self.bytes - bytes);
        }
        self.bytes = bytes;
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_are_released_and_waiters_told() {
        let gauge = IntGauge::new("held", "held").unwrap();
        let budget = Budget::new(100, gauge.clone());
        let session = Arc::new(AtomicUsize::new(0));
        let held = budget.charge(80, Some(session.clone()));
        let mut account = budget.account();
        account.set(30);
        assert_eq!(budget.held(), 110);
        assert_eq!(gauge.get(), 110);
        assert_eq!(session.load(Ordering::Relaxed), 80);
        assert!(budget.over());
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.until_below().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("told once under the limit")
            .unwrap();
        assert_eq!(session.load(Ordering::Relaxed), 0);
        account.set(10);
        assert_eq!(budget.held(), 10);
        drop(account);
        assert_eq!(budget.held(), 0);
    }
}
