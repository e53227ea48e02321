//! What presence costs: `members` clients subscribe to one key and
//! unsubscribe again as fast as their RECEIPTs come back (each round is a
//! join and a leave), while `watchers` watch `/presence/<key>`, on the
//! same node or another. Reports rounds per second, the CPU the watched
//! processes spent per round, and whether every watcher was told every
//! join and leave. Run with no watcher for the baseline: the difference
//! is presence's cost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use crate::procs::{self, round, Watched};
use crate::stomp::{self, frame, payload, scan, Endpoint, Ws};

#[derive(Clone, Debug, clap::Args)]
pub struct Shape {
    /// Clients subscribing and unsubscribing in turn.
    #[arg(long, default_value_t = 20)]
    members: usize,
    /// Clients watching `/presence/<key>`.
    #[arg(long, default_value_t = 0)]
    watchers: usize,
    /// Where the watchers connect (another node); default: --url.
    #[arg(long)]
    watch_url: Option<String>,
    #[arg(long, default_value = "10s", value_parser = crate::fanout::parse_duration)]
    duration: Duration,
}

pub async fn run(
    endpoint: Endpoint,
    shape: Shape,
    prefix: String,
    watched: Vec<Watched>,
) -> anyhow::Result<Value> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let key = format!("presence{}x{nanos}", std::process::id());
    let watch_endpoint = Endpoint {
        url: shape
            .watch_url
            .clone()
            .unwrap_or_else(|| endpoint.url.clone()),
        ..endpoint.clone()
    };
    let told = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut watchers = Vec::new();
    for _ in 0..shape.watchers {
        let mut ws = stomp::connect(&watch_endpoint).await?;
        let headers = [
            ("id", "who"),
            ("destination", &format!("/presence/{key}") as &str),
        ];
        ws.send(frame("SUBSCRIBE", &headers, "")).await?;
        wait_for(&mut ws, "snapshot", endpoint.timeout).await?;
        let (told, errors) = (told.clone(), errors.clone());
        watchers.push(tokio::spawn(
            async move { count_events(ws, told, errors).await },
        ));
    }
    let mut members = Vec::new();
    for _ in 0..shape.members {
        members.push(stomp::connect(&endpoint).await?);
    }
    let rounds = Arc::new(AtomicU64::new(0));
    let start_sample = procs::sample(&watched)?;
    let started = Instant::now();
    let until = started + shape.duration;
    let mut tasks = Vec::new();
    for ws in members {
        let (rounds, destination) = (rounds.clone(), format!("{prefix}{key}"));
        let wait = endpoint.timeout;
        tasks.push(tokio::spawn(async move {
            churn(ws, &destination, until, wait, rounds).await
        }));
    }
    for task in tasks {
        task.await.context("a member task")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let end_sample = procs::sample(&watched)?;
    let rounds = rounds.load(Ordering::Relaxed);
    // Every round is a join and a leave, told to every watcher.
    let want = 2 * rounds * shape.watchers as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let short = |told: u64, errors: u64| told < want && errors == 0;
    while short(told.load(Ordering::Relaxed), errors.load(Ordering::Relaxed))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for watcher in watchers {
        watcher.abort();
    }
    let cpu = procs::total_cpu(&start_sample, &end_sample);
    Ok(json!({
        "members": shape.members,
        "watchers": shape.watchers,
        "watchers_elsewhere": shape.watch_url.is_some(),
        "rounds": rounds,
        "rounds_per_s": round(rounds as f64 / elapsed, 1),
        "events_told": told.load(Ordering::Relaxed),
        "events_expected": want,
        // Watchers the gateway ended (an ERROR), e.g. past presence.max_pending.
        "watcher_errors": errors.load(Ordering::Relaxed),
        "cpu_us_per_round": round(cpu * 1e6 / rounds.max(1) as f64, 1),
        "procs": procs::report(&watched, &start_sample, &end_sample),
    }))
}

/// SUBSCRIBE and UNSUBSCRIBE with receipts, one after the other, until
/// `until`.
async fn churn(
    mut ws: Ws,
    destination: &str,
    until: Instant,
    wait: Duration,
    rounds: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    while Instant::now() < until {
        let subscribe = [("id", "m"), ("destination", destination), ("receipt", "s")];
        ws.send(frame("SUBSCRIBE", &subscribe, "")).await?;
        wait_for(&mut ws, "RECEIPT", wait).await?;
        ws.send(frame("UNSUBSCRIBE", &[("id", "m"), ("receipt", "u")], ""))
            .await?;
        wait_for(&mut ws, "RECEIPT", wait).await?;
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    ws.send(frame("DISCONNECT", &[], "")).await?;
    Ok(())
}

/// Reads until a RECEIPT (`what` = "RECEIPT") or a presence MESSAGE of
/// kind `what`.
async fn wait_for(ws: &mut Ws, what: &str, wait: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .with_context(|| format!("no {what} within {wait:?}"))?
            .ok_or_else(|| anyhow!("connection closed"))??;
        let Some(data) = payload(&message) else {
            continue;
        };
        let mut found = false;
        let mut error = None;
        scan(data, |f| match f.command {
            b"ERROR" => error = Some(String::from_utf8_lossy(f.body).into_owned()),
            b"RECEIPT" => found |= what == "RECEIPT",
            b"MESSAGE" => found |= f.header("stompgate-presence") == Some(what.as_bytes()),
            _ => {}
        })?;
        if let Some(error) = error {
            bail!("ERROR: {error}");
        }
        if found {
            return Ok(());
        }
    }
}

async fn count_events(
    mut ws: Ws,
    told: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    while let Some(message) = ws.next().await {
        let message = message?;
        if let Some(data) = payload(&message) {
            scan(data, |f| match f.command {
                b"MESSAGE" => {
                    told.fetch_add(1, Ordering::Relaxed);
                }
                b"ERROR" => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            })?;
        }
    }
    Ok(())
}
