//! The `conns` scenario: N idle connections with one subscription each.
//! Reports how many connected and how fast, the memory each costs the
//! watched server processes, and whether every one of them still receives:
//! one message per channel is published over AMQP at the end and each
//! connection must get it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::fanout::{parse_duration, run_id};
use crate::procs::{self, Watched};
use crate::stomp::{self, Endpoint};

#[derive(Clone, Debug, clap::Args)]
pub struct Conns {
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// New connections per second; 0 = as fast as `concurrency` allows.
    #[arg(long, default_value_t = 0)]
    pub connect_rate: u64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Stop opening connections after this many have failed (a server
    /// out of file descriptors makes each further attempt wait for its
    /// timeout).
    #[arg(long, default_value_t = 100)]
    pub max_failures: u64,
    /// Channels the subscriptions are spread over.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Idle time before the baseline memory is read (the servers settle
    /// after earlier runs) and after the last connection before it is
    /// read again.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub settle: Duration,
    /// How long every connection has to receive the check message.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub receive_timeout: Duration,
    /// Connection counts at which to read the servers' memory, after
    /// `settle` (e.g. 2000,5000,10000; the last is --connections): memory
    /// per connection is then the slope of a least-squares line through
    /// these points and the baseline at 0, per process and in total.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
}

pub async fn run(
    endpoint: Endpoint,
    prefix: String,
    amqp_url: String,
    args: Conns,
    watched: Vec<Watched>,
) -> anyhow::Result<Value> {
    let run = run_id();
    let keys: Arc<Vec<String>> = Arc::new(
        (0..args.channels.max(1))
            .map(|c| format!("bench.{run}.idle{c}"))
            .collect(),
    );
    tokio::time::sleep(args.settle).await;
    let before = procs::sample(&watched)?;
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let done = CancellationToken::new();
    let opening = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut pacer = (args.connect_rate > 0)
        .then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / args.connect_rate as f64)));
    let started = Instant::now();
    let mut clients = JoinSet::new();
    let mut attempted = 0;
    // (connections, sample) at the baseline and at each step.
    let mut points = vec![(0u64, before.clone())];
    let mut steps = args.steps.iter().copied().filter(|s| *s > 0).peekable();
    // Time spent settling at the steps: not connecting.
    let mut paused = Duration::ZERO;
    for i in 0..args.connections {
        if steps.peek() == Some(&i) {
            steps.next();
            let all = u32::try_from(args.concurrency.max(1)).unwrap_or(u32::MAX);
            let turns = opening.acquire_many(all).await?;
            let pause = Instant::now();
            tokio::time::sleep(args.settle).await;
            points.push((connected.load(Ordering::Relaxed), procs::sample(&watched)?));
            paused += pause.elapsed();
            drop(turns);
        }
        if failed.load(Ordering::Relaxed) >= args.max_failures {
            break;
        }
        if let Some(pacer) = pacer.as_mut() {
            pacer.tick().await;
        }
        let turn = opening.clone().acquire_owned().await?;
        attempted += 1;
        let destination = format!("{prefix}{}", keys[i % keys.len()]);
        let endpoint = endpoint.clone();
        let (connected, failed, received) = (connected.clone(), failed.clone(), received.clone());
        let (first_error, done) = (first_error.clone(), done.clone());
        clients.spawn(async move {
            let opened = async {
                let mut ws = stomp::connect(&endpoint).await?;
                stomp::subscribe(&mut ws, &destination, endpoint.timeout).await?;
                anyhow::Ok(ws)
            }
            .await;
            drop(turn);
            let mut ws = match opened {
                Ok(ws) => ws,
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    let mut first = first_error.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert_with(|| format!("connection {i}: {e:#}"));
                    return;
                }
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let mut got = false;
            loop {
                let message = tokio::select! {
                    _ = done.cancelled() => break,
                    m = ws.next() => m,
                };
                let Some(Ok(message)) = message else { break };
                let Some(data) = stomp::payload(&message) else {
                    continue;
                };
                let mut message_seen = false;
                let _ = stomp::scan(data, |f| message_seen |= f.command == b"MESSAGE");
                if message_seen && !got {
                    got = true;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
        });
    }
    // Every attempt has finished connecting (or failed) once all turns
    // are back.
    let all = u32::try_from(args.concurrency.max(1)).unwrap_or(u32::MAX);
    let _turns = opening.acquire_many(all).await?;
    let connect_seconds = (started.elapsed() - paused).as_secs_f64();
    let after_connect = procs::sample(&watched)?;
    tokio::time::sleep(args.settle).await;
    let settled = procs::sample(&watched)?;
    let ok = connected.load(Ordering::Relaxed);
    points.push((ok, settled.clone()));
    let memory = (!args.steps.is_empty()).then(|| regression(&watched, &points));

    let check = Instant::now();
    // A broker out of file descriptors (Web-STOMP at thousands of
    // clients) refuses the check's own connection: the counts so far
    // still go into the report, with the reason.
    let check_error = publish_check(&amqp_url, &keys)
        .await
        .context("publishing the check message over AMQP")
        .err()
        .map(|e| format!("{e:#}"));
    let deadline = check + args.receive_timeout;
    while check_error.is_none()
        && received.load(Ordering::Relaxed) < ok
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_received_s = check.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    done.cancel();
    clients.join_all().await;

    let growth = procs::total_rss_growth_kib(&before, &settled);
    let connect_cpu = procs::total_cpu(&before, &after_connect);
    Ok(json!({
        "connections": args.connections,
        "attempted": attempted,
        "connected": ok,
        "failed": failed.load(Ordering::Relaxed),
        "first_error": first_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        "check_error": check_error,
        "connect_s": procs::round(connect_seconds, 3),
        "connects_per_s": procs::round(ok as f64 / connect_seconds, 1),
        "server_cpu_ms_per_connect": if ok > 0 {
            Value::from(procs::round(connect_cpu * 1e3 / ok as f64, 3))
        } else {
            Value::Null
        },
        "server": procs::report(&watched, &before, &settled),
        "rss_growth_kib": growth,
        "kib_per_connection": if ok > 0 {
            Value::from(procs::round(growth as f64 / ok as f64, 1))
        } else {
            Value::Null
        },
        "received": got,
        "all_receiving": ok > 0 && got == ok,
        "receive_s": procs::round(all_received_s, 3),
        "memory": memory,
    }))
}

/// Memory per connection as the slope of a least-squares line through
/// (connections, resident KiB) at every point, per process and for all
/// together, with how well the line fits (r²). A slope that is not above
/// zero is no measure of what a connection costs (the process gave memory
/// back, or another grew it meanwhile): `valid` says so, and the report
/// shows a failure, not a figure.
fn regression(watched: &[Watched], points: &[(u64, procs::Sample)]) -> Value {
    let fit = |ys: &[f64]| -> (f64, f64) {
        let xs: Vec<f64> = points.iter().map(|(n, _)| *n as f64).collect();
        let n = xs.len() as f64;
        let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
        let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
        let syy: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        let r2 = if sxx > 0.0 && syy > 0.0 {
            sxy * sxy / (sxx * syy)
        } else {
            0.0
        };
        (slope, r2)
    };
    let mut per = serde_json::Map::new();
    let mut valid = true;
    for (i, w) in watched.iter().enumerate() {
        let ys: Vec<f64> = points.iter().map(|(_, s)| s.rss_kib[i] as f64).collect();
        let (slope, r2) = fit(&ys);
        valid &= slope > 0.0;
        per.insert(
            w.name.clone(),
            json!({"kib_per_connection": procs::round(slope, 2), "r2": procs::round(r2, 3)}),
        );
    }
    let totals: Vec<f64> = points
        .iter()
        .map(|(_, s)| s.rss_kib.iter().sum::<u64>() as f64)
        .collect();
    let (slope, r2) = fit(&totals);
    valid &= slope > 0.0;
    json!({
        "points": points
            .iter()
            .map(|(n, s)| {
                let rss: serde_json::Map<String, Value> = watched
                    .iter()
                    .zip(&s.rss_kib)
                    .map(|(w, kib)| (w.name.clone(), Value::from(*kib)))
                    .collect();
                json!({"connections": n, "rss_kib": rss})
            })
            .collect::<Vec<_>>(),
        "processes": per,
        "kib_per_connection": procs::round(slope, 2),
        "r2": procs::round(r2, 3),
        "valid": valid,
    })
}

/// One message per channel, published over AMQP to `amq.topic` with
/// confirms, so the check works whatever the STOMP side can still accept.
async fn publish_check(url: &str, keys: &[String]) -> anyhow::Result<()> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for key in keys {
        channel
            .basic_publish(
                "amq.topic".into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                b"check",
                BasicProperties::default(),
            )
            .await?
            .await?;
    }
    let _ = connection.close(200, "benchmark done".into()).await;
    Ok(())
}
