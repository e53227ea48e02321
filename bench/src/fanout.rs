//! The `fanout` scenario: S subscribers spread over C channels, P
//! publishers sending to the channels in turn, at a target rate or as fast
//! as receipts allow. Every body carries its publisher, sequence number and
//! send time, so subscribers count loss, duplicates and per-publisher order
//! and measure end-to-end latency. The transport (STOMP over WebSocket
//! here, plain AMQP in `amqp.rs`) only moves bodies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::procs::{self, Watched};
use crate::stomp::{self, Endpoint};

/// The fan-out's shape and pace, shared by both transports.
#[derive(Clone, Debug, clap::Args)]
pub struct Shape {
    /// Subscribers, spread round-robin over the channels.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Channels (routing keys `bench.<run>.<n>`).
    #[arg(long, default_value_t = 2)]
    pub channels: usize,
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Messages per second published in all; 0 = as fast as receipts allow.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Most unconfirmed messages per publisher.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Publishing before the measured window (not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// The measured window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After publishing stops, how long to wait for the last deliveries.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Subscribers connecting at once.
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms or 10s"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Nanoseconds since the benchmark started: the clock in message bodies
/// (publishers and subscribers share this process, so one clock serves).
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A name no earlier run used, for routing keys and queues.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// Counters every task updates.
pub struct Shared {
    pub shape: Shape,
    /// Routing keys, one per channel.
    pub keys: Vec<String>,
    /// Subscribers that are subscribed, per channel.
    pub subscribed: Vec<AtomicU64>,
    /// Inside the measured window: latencies are recorded.
    measuring: AtomicBool,
    pub delivered: AtomicU64,
    pub unique: AtomicU64,
    pub confirmed: AtomicU64,
    /// Deliveries owed for the confirmed messages.
    pub expected: AtomicU64,
    pub errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Publishers wait for it, so every subscriber is in place first.
    pub go: watch::Sender<bool>,
    /// Publishers stop when it fires; subscribers when `done` fires.
    pub stop: CancellationToken,
    pub done: CancellationToken,
}

impl Shared {
    pub fn new(shape: Shape) -> Arc<Shared> {
        let run = run_id();
        let keys = (0..shape.channels)
            .map(|c| format!("bench.{run}.{c}"))
            .collect();
        Arc::new(Shared {
            subscribed: (0..shape.channels).map(|_| AtomicU64::new(0)).collect(),
            keys,
            shape,
            measuring: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            go: watch::channel(false).0,
            stop: CancellationToken::new(),
            done: CancellationToken::new(),
        })
    }

    pub fn fail(&self, error: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| format!("{error:#}"));
    }

    /// The channel publisher `p` sends its message `seq` to: publishers
    /// take the channels in turn, so every channel gets traffic.
    pub fn channel_of(&self, publisher: usize, seq: u64) -> usize {
        (publisher + seq as usize) % self.shape.channels
    }

    /// The broker confirmed `seq` of publisher `p`.
    pub fn confirmed(&self, publisher: usize, seq: u64) {
        self.confirmed.fetch_add(1, Ordering::Relaxed);
        let channel = self.channel_of(publisher, seq);
        let owed = self.subscribed[channel].load(Ordering::Relaxed);
        self.expected.fetch_add(owed, Ordering::Relaxed);
    }

    /// Subscriber `i`'s channel.
    pub fn channel_of_subscriber(&self, i: usize) -> usize {
        i % self.shape.channels
    }

    /// A body of `shape.size` bytes: publisher, sequence, send time.
    pub fn body(&self, publisher: usize, seq: u64) -> String {
        let mut body = format!("{publisher} {seq} {} ", now_ns());
        if body.len() < self.shape.size {
            body.extend(std::iter::repeat_n('x', self.shape.size - body.len()));
        }
        body
    }

    /// Waits for the go signal, or fails when the run ends first.
    pub async fn wait_go(&self) -> anyhow::Result<()> {
        let mut go = self.go.subscribe();
        tokio::select! {
            r = go.wait_for(|g| *g) => r.map(|_| ()).map_err(|_| anyhow!("run ended")),
            _ = self.stop.cancelled() => bail!("stopped before publishing began"),
        }
    }

    /// Paces one publisher at its share of `shape.rate` (None: unpaced).
    pub fn pacer(&self) -> Option<tokio::time::Interval> {
        if self.shape.rate == 0 {
            return None;
        }
        let period = Duration::from_secs_f64(self.shape.publishers as f64 / self.shape.rate as f64);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
        Some(interval)
    }

    /// Waits for a publisher's next turn: its pace (if any), then a free
    /// slot in its window of unconfirmed messages. False once publishing
    /// stops.
    pub async fn next_turn(
        &self,
        pacer: &mut Option<tokio::time::Interval>,
        permits: &Semaphore,
    ) -> anyhow::Result<bool> {
        if let Some(pacer) = pacer.as_mut() {
            tokio::select! {
                _ = pacer.tick() => {}
                _ = self.stop.cancelled() => return Ok(false),
            }
        }
        tokio::select! {
            permit = permits.acquire() => permit?.forget(),
            _ = self.stop.cancelled() => return Ok(false),
        }
        Ok(true)
    }
}

/// One subscriber's view: which (publisher, seq) it got, in what order,
/// how late.
pub struct Tracker {
    seen: Vec<Vec<u64>>,
    last: Vec<Option<u64>>,
    pub duplicates: u64,
    pub order_violations: u64,
    pub malformed: u64,
    pub latency_us: Histogram<u64>,
}

impl Tracker {
    pub fn new(publishers: usize) -> Tracker {
        Tracker {
            seen: vec![Vec::new(); publishers],
            last: vec![None; publishers],
            duplicates: 0,
            order_violations: 0,
            malformed: 0,
            latency_us: latency_histogram(),
        }
    }

    pub fn record(&mut self, body: &[u8], shared: &Shared) {
        let received = now_ns();
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        let mut fields = body.split(|&b| b == b' ').map(parse_u64);
        let (Some(Some(p)), Some(Some(seq)), Some(Some(sent))) =
            (fields.next(), fields.next(), fields.next())
        else {
            self.malformed += 1;
            return;
        };
        let p = p as usize;
        if p >= self.seen.len() {
            self.malformed += 1;
            return;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        let seen = &mut self.seen[p];
        if seen.len() <= word {
            seen.resize(word + 1, 0);
        }
        if seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        seen[word] |= bit;
        shared.unique.fetch_add(1, Ordering::Relaxed);
        if self.last[p].is_some_and(|last| seq < last) {
            self.order_violations += 1;
        }
        self.last[p] = Some(self.last[p].map_or(seq, |last| last.max(seq)));
        if shared.measuring.load(Ordering::Relaxed) {
            let micros = received.saturating_sub(sent) / 1000;
            let _ = self.latency_us.record(micros.max(1));
        }
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Runs the measured part once subscribers and publishers are set up:
/// go, warm up, measure, stop publishing, wait for the last deliveries.
/// Returns the report's common fields.
pub async fn measure(
    shared: &Arc<Shared>,
    watched: &[Watched],
    publishers: JoinSet<()>,
) -> anyhow::Result<Value> {
    let shape = &shared.shape;
    let me = [Watched {
        name: "bench".into(),
        pid: std::process::id(),
    }];
    shared.go.send_replace(true);
    tokio::time::sleep(shape.warmup).await;
    let (servers_start, me_start) = (procs::sample(watched)?, procs::sample(&me)?);
    let (delivered_start, confirmed_start) = (
        shared.delivered.load(Ordering::Relaxed),
        shared.confirmed.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    shared.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(shape.duration).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let (servers_end, me_end) = (procs::sample(watched)?, procs::sample(&me)?);
    let delivered = shared.delivered.load(Ordering::Relaxed) - delivered_start;
    let confirmed = shared.confirmed.load(Ordering::Relaxed) - confirmed_start;

    shared.stop.cancel();
    publishers.join_all().await;
    // Bounded: whatever has not come within `drain` counts as lost.
    let deadline = Instant::now() + shape.drain;
    while shared.unique.load(Ordering::Relaxed) < shared.expected.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server_cpu = procs::total_cpu(&servers_start, &servers_end);
    let expected = shared.expected.load(Ordering::Relaxed);
    let unique = shared.unique.load(Ordering::Relaxed);
    Ok(json!({
        "published_per_s": procs::round(confirmed as f64 / elapsed, 1),
        "delivered_per_s": procs::round(delivered as f64 / elapsed, 1),
        "expected": expected,
        "delivered_unique": unique,
        "loss": expected.saturating_sub(unique),
        "server": procs::report(watched, &servers_start, &servers_end),
        "server_cpu_us_per_delivered": if delivered > 0 && !watched.is_empty() {
            Value::from(procs::round(server_cpu * 1e6 / delivered as f64, 2))
        } else {
            Value::Null
        },
        "bench_cpu_s": procs::round(procs::total_cpu(&me_start, &me_end), 3),
    }))
}

/// Merges subscribers' trackers into the report.
pub fn summarize(shared: &Shared, trackers: Vec<Tracker>, report: &mut Value) {
    let mut latency = latency_histogram();
    let (mut duplicates, mut order, mut malformed) = (0, 0, 0);
    for t in &trackers {
        let _ = latency.add(&t.latency_us);
        duplicates += t.duplicates;
        order += t.order_violations;
        malformed += t.malformed;
    }
    let q = |q: f64| latency.value_at_quantile(q);
    let shape = &shared.shape;
    let extra = json!({
        "subscribers": shape.subscribers,
        "subscribed": shared.subscribed.iter().map(|s| s.load(Ordering::Relaxed)).sum::<u64>(),
        "channels": shape.channels,
        "publishers": shape.publishers,
        "rate": shape.rate,
        "window": shape.window,
        "size": shape.size,
        "duration_s": shape.duration.as_secs_f64(),
        "duplicates": duplicates,
        "order_violations": order,
        "malformed": malformed,
        "latency_us": {
            "count": latency.len(),
            "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99_9": q(0.999),
            "max": latency.max(),
        },
        "errors": shared.errors.load(Ordering::Relaxed),
        "first_error": shared.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    });
    if let (Value::Object(report), Value::Object(extra)) = (report, extra) {
        report.extend(extra);
    }
}

/// The fan-out over STOMP: `prefix` + key is the destination both for
/// SUBSCRIBE and SEND (`/topic/` on stompgate and Web-STOMP alike).
pub async fn run_stomp(
    endpoint: Endpoint,
    shape: Shape,
    prefix: String,
    watched: Vec<Watched>,
) -> anyhow::Result<Value> {
    let shared = Shared::new(shape);
    let shape = shared.shape.clone();
    let connecting = Arc::new(Semaphore::new(shape.connect_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(shape.subscribers.max(1));
    let mut subscribers = JoinSet::new();
    for i in 0..shape.subscribers {
        let (shared, endpoint, connecting) = (shared.clone(), endpoint.clone(), connecting.clone());
        let (ready, prefix) = (ready_tx.clone(), prefix.clone());
        subscribers.spawn(async move {
            let channel = shared.channel_of_subscriber(i);
            let destination = format!("{prefix}{}", shared.keys[channel]);
            let opened = async {
                let _turn = connecting.acquire().await?;
                let mut ws = stomp::connect(&endpoint).await?;
                stomp::subscribe(&mut ws, &destination, endpoint.timeout).await?;
                anyhow::Ok(ws)
            }
            .await;
            let _ = ready.send(()).await;
            let ws = match opened {
                Ok(ws) => ws,
                Err(e) => {
                    shared.fail(&e.context(format!("subscriber {i}")));
                    return None;
                }
            };
            shared.subscribed[channel].fetch_add(1, Ordering::Relaxed);
            Some(stomp_subscriber(ws, &shared).await)
        });
    }
    drop(ready_tx);
    for _ in 0..shape.subscribers {
        ready_rx.recv().await;
    }
    let mut publishers = JoinSet::new();
    for p in 0..shape.publishers {
        let (shared, endpoint) = (shared.clone(), endpoint.clone());
        let prefix = prefix.clone();
        publishers.spawn(async move {
            if let Err(e) = stomp_publisher(p, &endpoint, &prefix, &shared).await {
                shared.fail(&e.context(format!("publisher {p}")));
            }
        });
    }
    let mut report = measure(&shared, &watched, publishers).await?;
    shared.done.cancel();
    let trackers = subscribers.join_all().await.into_iter().flatten().collect();
    summarize(&shared, trackers, &mut report);
    Ok(report)
}

async fn stomp_subscriber(ws: stomp::Ws, shared: &Shared) -> Tracker {
    let mut tracker = Tracker::new(shared.shape.publishers);
    let (mut sink, mut stream) = ws.split();
    let failure = loop {
        let message = tokio::select! {
            _ = shared.done.cancelled() => break None,
            m = stream.next() => m,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(e)) => break Some(anyhow!(e)),
            None => break Some(anyhow!("connection closed by the server")),
        };
        let Some(data) = stomp::payload(&message) else {
            if let Message::Close(close) = message {
                break Some(anyhow!("closed by the server: {close:?}"));
            }
            continue;
        };
        let mut error = None;
        let scanned = stomp::scan(data, |f| match f.command {
            b"MESSAGE" => tracker.record(f.body, shared),
            b"ERROR" => error = Some(anyhow!("ERROR {}", String::from_utf8_lossy(f.body))),
            _ => {}
        });
        if let Some(e) = error.or(scanned.err()) {
            break Some(e);
        }
    };
    if let Some(e) = failure {
        shared.fail(&e.context("subscriber"));
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    tracker
}

async fn stomp_publisher(
    p: usize,
    endpoint: &Endpoint,
    prefix: &str,
    shared: &Arc<Shared>,
) -> anyhow::Result<()> {
    let ws = stomp::connect(endpoint).await?;
    let (mut sink, mut stream) = ws.split();
    let window = shared.shape.window.max(1);
    let permits = Arc::new(Semaphore::new(window));
    // Receipts come back in order; each frees a slot in the window.
    let receipts = {
        let (shared, permits) = (shared.clone(), permits.clone());
        tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                let message = message?;
                let Some(data) = stomp::payload(&message) else {
                    continue;
                };
                let mut error = None;
                stomp::scan(data, |f| match f.command {
                    b"RECEIPT" => {
                        let seq = f.header("receipt-id").and_then(parse_u64);
                        match seq {
                            Some(seq) => shared.confirmed(p, seq),
                            None => error = Some(anyhow!("RECEIPT without our receipt-id")),
                        }
                        permits.add_permits(1);
                    }
                    b"ERROR" => error = Some(anyhow!("ERROR {}", String::from_utf8_lossy(f.body))),
                    _ => {}
                })?;
                if let Some(e) = error {
                    return Err(e);
                }
            }
            anyhow::Ok(())
        })
    };
    let destinations: Vec<String> = shared.keys.iter().map(|k| format!("{prefix}{k}")).collect();
    shared.wait_go().await?;
    let mut pacer = shared.pacer();
    let mut seq = 0u64;
    loop {
        if !shared.next_turn(&mut pacer, &permits).await? {
            break;
        }
        let receipt = seq.to_string();
        let destination = &destinations[shared.channel_of(p, seq)];
        let headers = [
            ("destination", destination.as_str()),
            ("receipt", receipt.as_str()),
            ("content-type", "text/plain"),
        ];
        sink.send(stomp::frame("SEND", &headers, &shared.body(p, seq)))
            .await?;
        seq += 1;
    }
    // Every receipt back before the connection goes, so `expected` is
    // complete; bounded by the drain time.
    let all = u32::try_from(window).unwrap_or(u32::MAX);
    tokio::time::timeout(shared.shape.drain, permits.acquire_many(all))
        .await
        .context("receipts still missing after the drain time")??
        .forget();
    receipts.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    Ok(())
}
