//! Admission limits on WebSocket connections: per node and per client IP.
//! A permit is taken before the upgrade and given back when dropped, so
//! however a session ends, its slot is freed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    /// IPv6 addresses count by this prefix: one host usually holds a whole
    /// /64, and would walk around a per-address limit otherwise.
    ipv6_prefix: u8,
    total: AtomicUsize,
    /// Only touched on connect and disconnect, never per message.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Which limit refused a connection: the config key names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Node(usize),
    Ip(usize),
}

impl Refusal {
    pub fn key(self) -> &'static str {
        match self {
            Refusal::Node(_) => "server.max_connections",
            Refusal::Ip(_) => "server.max_connections_per_ip",
        }
    }

    pub fn detail(self) -> String {
        match self {
            Refusal::Node(n) => {
                format!("this node already serves server.max_connections ({n}) connections")
            }
            Refusal::Ip(n) => {
                format!("your address already has server.max_connections_per_ip ({n}) connections")
            }
        }
    }
}

/// A connection's place under the limits, released on drop.
pub struct Permit {
    limits: Arc<ConnectionLimits>,
    ip: Option<IpAddr>,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize, ipv6_prefix: u8) -> ConnectionLimits {
        ConnectionLimits {
            max_total,
            max_per_ip,
            ipv6_prefix,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    pub fn acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Permit, Refusal> {
        let total = self.total.fetch_add(1, Ordering::AcqRel);
        if total >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Node(self.max_total));
        }
        let ip = ip.map(|ip| network_of(ip, self.ipv6_prefix));
        if let Some(ip) = ip {
            let mut per_ip = self.lock();
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                drop(per_ip);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::Ip(self.max_per_ip));
            }
            *count += 1;
        }
        Ok(Permit {
            limits: self.clone(),
            ip,
        })
    }

    /// A poisoned lock only means a panic elsewhere mid-update of a count.
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_ip.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self.limits.lock();
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An address as per-address limits count it: an IPv4 address as it is,
/// an IPv6 address by its first `ipv6_prefix` bits.
pub fn network_of(address: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match address {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = match ipv6_prefix.min(128) {
                0 => 0,
                n => u128::MAX << (128 - u32::from(n)),
            };
            IpAddr::from(std::net::Ipv6Addr::from(bits & keep))
        }
        v4 => v4,
    }
}

/// Per-session SEND rate: token buckets for frames and for bytes. A SEND
/// always goes through, but one that overdraws a bucket makes the session
/// stop reading until the debt is paid: throttling by not reading, never
/// by buffering.
pub struct PublishRate {
    frames: Bucket,
    bytes: Bucket,
}

struct Bucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn new(per_second: f64, burst: f64) -> Bucket {
        Bucket {
            per_second,
            burst,
            tokens: burst,
            at: tokio::time::Instant::now(),
        }
    }

    /// Takes `n` tokens; how long until the debt is paid, if there is one.
    fn take(&mut self, n: f64, now: tokio::time::Instant) -> std::time::Duration {
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst) - n;
        self.at = now;
        std::time::Duration::from_secs_f64((-self.tokens).max(0.0) / self.per_second)
    }
}

impl PublishRate {
    pub fn new(
        per_second: u32,
        burst: u32,
        bytes_per_second: u64,
        bytes_burst: u64,
    ) -> PublishRate {
        PublishRate {
            frames: Bucket::new(f64::from(per_second), f64::from(burst)),
            bytes: Bucket::new(bytes_per_second as f64, bytes_burst as f64),
        }
    }

    /// Takes one SEND of `bytes`; returns until when reading must pause,
    /// if it must.
    pub fn take(&mut self, bytes: usize) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let pause = self
            .frames
            .take(1.0, now)
            .max(self.bytes.take(bytes as f64, now));
        (!pause.is_zero()).then(|| now + pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_per_node_and_per_ip() {
        let limits = Arc::new(ConnectionLimits::new(3, 2, 64));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.acquire(Some(a)).unwrap();
        let _second = limits.acquire(Some(a)).unwrap();
        assert_eq!(limits.acquire(Some(a)).err(), Some(Refusal::Ip(2)));
        let _third = limits.acquire(Some(b)).unwrap();
        assert_eq!(limits.acquire(Some(b)).err(), Some(Refusal::Node(3)));
        drop(first);
        assert!(limits.acquire(Some(a)).is_ok());
    }

    #[test]
    fn ipv6_addresses_count_by_their_prefix() {
        let limits = Arc::new(ConnectionLimits::new(10, 2, 64));
        let host: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let next_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _a = limits.acquire(Some(host)).unwrap();
        let _b = limits.acquire(Some(same_64)).unwrap();
        assert_eq!(limits.acquire(Some(host)).err(), Some(Refusal::Ip(2)));
        assert!(limits.acquire(Some(next_64)).is_ok());
        assert_eq!(network_of(host, 128), host);
        assert_eq!(network_of(host, 0), "::".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(network_of(v4, 64), v4);
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_the_burst_then_the_rate() {
        let mut rate = PublishRate::new(10, 5, 1 << 30, 1 << 30);
        for _ in 0..5 {
            assert_eq!(rate.take(1), None);
        }
        let pause = rate.take(1).expect("overdrawn after the burst");
        assert_eq!(
            pause - tokio::time::Instant::now(),
            std::time::Duration::from_millis(100)
        );
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        assert!(rate.take(1).is_some(), "one token came back and went again");
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_a_bucket_of_their_own() {
        // 1000 bytes a second, a burst of 1000: few frames, large ones.
        let mut rate = PublishRate::new(1000, 1000, 1000, 1000);
        assert_eq!(rate.take(600), None);
        let pause = rate.take(600).expect("overdrawn by 200 bytes");
        assert_eq!(
            pause - tokio::time::Instant::now(),
            std::time::Duration::from_millis(200)
        );
    }
}
