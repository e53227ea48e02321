//! Password checks that cannot exhaust a node. argon2 is CPU- and
//! memory-hard on purpose (19 MiB and tens of milliseconds a check with
//! the default parameters), so one client address reconnecting with wrong
//! passcodes used to run a check per connection, each in a blocking thread
//! of its own with 19 MiB freshly allocated: 32 such clients held 4.7 GB.
//!
//! Here at most `auth.max_concurrent_logins` checks run at once, each in a
//! memory block reused from a pool (the pool never holds more blocks than
//! checks can run); at most `auth.max_pending_logins` wait for their turn,
//! and beyond that a login is refused at once ("try again later"). A
//! client address, or a user name, with `auth.failed_login_limit` failed
//! logins within `auth.failed_login_window` is refused without a check
//! until the window has passed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use argon2::password_hash::PasswordHash;
use argon2::{Argon2, Block, Params};
use tokio::sync::Semaphore;

use super::AuthError;
use crate::limits::network_of;

/// Most addresses and names whose failures are remembered: past it the
/// oldest windows are forgotten first, so the table stays bounded
/// whatever an attacker sends.
const MAX_TRACKED: usize = 100_000;

pub struct Checker {
    permits: Semaphore,
    /// Checks waiting for a permit.
    pending: AtomicUsize,
    max_pending: usize,
    /// Memory blocks of finished checks, for the next ones.
    pool: Arc<Mutex<Vec<Vec<Block>>>>,
    failures: Mutex<HashMap<Key, Window>>,
    limit: u32,
    window: Duration,
    /// IPv6 addresses count by this prefix.
    ipv6_prefix: u8,
}

/// Who failed: the client's address (an IPv6 address by its /64, which
/// one host usually holds whole), or the user name tried.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    since: Instant,
    failures: u32,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Checker {
    pub fn new(
        concurrent: usize,
        max_pending: usize,
        limit: u32,
        window: Duration,
        ipv6_prefix: u8,
    ) -> Checker {
        let concurrent = match concurrent {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Checker {
            permits: Semaphore::new(concurrent),
            pending: AtomicUsize::new(0),
            max_pending,
            pool: Arc::new(Mutex::new(Vec::new())),
            failures: Mutex::new(HashMap::new()),
            limit,
            window,
            ipv6_prefix,
        }
    }

    /// Whether `password` matches the PHC string `hash`, for a client at
    /// `peer` trying `user`. Refused without a check when either has
    /// failed too often lately, or when too many checks wait already.
    pub async fn check(
        &self,
        hash: &str,
        password: &str,
        peer: Option<IpAddr>,
        user: &str,
    ) -> Result<bool, AuthError> {
        let keys = [
            peer.map(|p| Key::Address(network_of(p, self.ipv6_prefix))),
            Some(Key::User(user.to_owned())),
        ];
        if keys.iter().flatten().any(|k| self.throttled(k)) {
            return Err(AuthError::Throttled);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(AuthError::Busy);
        }
        let permit = self.permits.acquire().await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        let _permit = permit.map_err(|_| AuthError::Busy)?;
        let (hash, password, pool) = (hash.to_owned(), password.to_owned(), self.pool.clone());
        let verified = tokio::task::spawn_blocking(move || {
            let mut memory = lock(&pool).pop().unwrap_or_default();
            let verified = verify(&hash, password.as_bytes(), &mut memory);
            lock(&pool).push(memory);
            verified
        })
        .await
        .unwrap_or(false);
        if !verified {
            for key in keys.into_iter().flatten() {
                self.failed(key);
            }
        }
        Ok(verified)
    }

    fn throttled(&self, key: &Key) -> bool {
        let failures = lock(&self.failures);
        failures
            .get(key)
            .is_some_and(|w| w.since.elapsed() < self.window && w.failures >= self.limit)
    }

    fn failed(&self, key: Key) {
        let mut failures = lock(&self.failures);
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&key) {
            let window = self.window;
            failures.retain(|_, w| w.since.elapsed() < window);
            if failures.len() >= MAX_TRACKED {
                // Still full within the window: forget the oldest half.
                let mut ages: Vec<Instant> = failures.values().map(|w| w.since).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                failures.retain(|_, w| w.since > cut);
            }
        }
        let now = Instant::now();
        let entry = failures.entry(key).or_insert(Window {
            since: now,
            failures: 0,
        });
        if entry.since.elapsed() >= self.window {
            *entry = Window {
                since: now,
                failures: 0,
            };
        }
        entry.failures = entry.failures.saturating_add(1);
    }
}

/// argon2 verification of `password` against the PHC string `hash`, in
/// `memory` (grown to what the hash's parameters need, and kept for the
/// next check). Compares in constant time.
fn verify(hash: &str, password: &[u8], memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = parsed
        .version
        .and_then(|v| argon2::Version::try_from(v).ok())
        .unwrap_or_default();
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let expected = expected.as_bytes();
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, params);
    if argon2
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..])
        .is_err()
    {
        return false;
    }
    out.iter()
        .zip(expected)
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_as_argon2_does() {
        let hash = crate::auth::hash_password("correct horse").unwrap();
        let mut memory = Vec::new();
        assert!(verify(&hash, b"correct horse", &mut memory));
        assert!(!verify(&hash, b"wrong horse", &mut memory));
        assert!(!verify("not a hash", b"x", &mut memory));
        // The block is kept for the next check: 19 MiB, allocated once.
        assert_eq!(memory.len(), 19 * 1024);
    }

    #[tokio::test]
    async fn failures_are_throttled_per_address_and_per_user() {
        let hash = crate::auth::hash_password("right").unwrap();
        let checker = Checker::new(1, 10, 2, Duration::from_secs(60), 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b_neighbour: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        for _ in 0..2 {
            assert_eq!(
                checker.check(&hash, "wrong", Some(a), "u1").await.ok(),
                Some(false)
            );
        }
        // The address is throttled, even for the right passcode...
        assert!(matches!(
            checker.check(&hash, "right", Some(a), "u2").await,
            Err(AuthError::Throttled)
        ));
        // ...and so is the user name, from another address.
        assert!(matches!(
            checker.check(&hash, "right", Some(b), "u1").await,
            Err(AuthError::Throttled)
        ));
        assert_eq!(
            checker.check(&hash, "right", Some(b), "u3").await.ok(),
            Some(true)
        );
        // An IPv6 /64 counts as one address.
        for user in ["v1", "v2"] {
            let _ = checker.check(&hash, "wrong", Some(b), user).await;
        }
        assert!(matches!(
            checker.check(&hash, "right", Some(b_neighbour), "v3").await,
            Err(AuthError::Throttled)
        ));
    }

    #[tokio::test]
    async fn checks_beyond_the_queue_are_refused_at_once() {
        let hash = crate::auth::hash_password("right").unwrap();
        let checker = Arc::new(Checker::new(1, 2, 1000, Duration::from_secs(60), 64));
        let mut tasks = Vec::new();
        for i in 0..12 {
            let (checker, hash) = (checker.clone(), hash.clone());
            tasks.push(tokio::spawn(async move {
                checker.check(&hash, "wrong", None, &format!("u{i}")).await
            }));
        }
        let mut busy = 0;
        for task in tasks {
            if let Err(AuthError::Busy) = task.await.unwrap() {
                busy += 1;
            }
        }
        // One runs, two wait: the rest are turned away without a check.
        assert!(busy >= 9, "{busy} of 12 refused");
        assert!(
            lock(&checker.pool).len() <= 1,
            "one check at a time, one block"
        );
    }
}
