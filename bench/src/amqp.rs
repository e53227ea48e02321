//! The same fan-out straight over AMQP with lapin: the ceiling a gateway
//! in front of this broker could reach. Each subscriber has its own
//! exclusive queue bound to `amq.topic` (as a gateway session has),
//! consumed without acks; publishers use confirms with the same window.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::fanout::{self, Shape, Shared, Tracker};
use crate::procs::Watched;

const EXCHANGE: &str = "amq.topic";

pub async fn run(
    url: String,
    connections: usize,
    shape: Shape,
    watched: Vec<Watched>,
) -> anyhow::Result<Value> {
    let shared = Shared::new(shape);
    let shape = shared.shape.clone();
    let mut consumers = Vec::new();
    for _ in 0..connections.max(1) {
        consumers.push(
            Connection::connect(&url, ConnectionProperties::default())
                .await
                .with_context(|| format!("AMQP connection to {url}"))?,
        );
    }
    let mut subscribers = JoinSet::new();
    for i in 0..shape.subscribers {
        let channel = shared.channel_of_subscriber(i);
        let queue = format!("{}.q{i}", shared.keys[channel]);
        let consumer = async {
            let ch = consumers[i % consumers.len()].create_channel().await?;
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            ch.queue_declare(queue.as_str().into(), options, FieldTable::default())
                .await?;
            ch.queue_bind(
                queue.as_str().into(),
                EXCHANGE.into(),
                shared.keys[channel].as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            let options = BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            };
            let consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    options,
                    FieldTable::default(),
                )
                .await?;
            anyhow::Ok((ch, consumer))
        }
        .await;
        let (ch, mut consumer) = match consumer {
            Ok(c) => c,
            Err(e) => {
                shared.fail(&e.context(format!("subscriber {i}")));
                continue;
            }
        };
        shared.subscribed[channel].fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        subscribers.spawn(async move {
            let mut tracker = Tracker::new(shared.shape.publishers);
            loop {
                let delivery = tokio::select! {
                    _ = shared.done.cancelled() => break,
                    d = consumer.next() => d,
                };
                match delivery {
                    Some(Ok(delivery)) => tracker.record(&delivery.data, &shared),
                    Some(Err(e)) => {
                        shared.fail(&anyhow::Error::from(e).context("consumer"));
                        break;
                    }
                    None => break,
                }
            }
            drop(ch);
            tracker
        });
    }
    let mut publishers = JoinSet::new();
    for p in 0..shape.publishers {
        let (shared, url) = (shared.clone(), url.clone());
        publishers.spawn(async move {
            if let Err(e) = publisher(p, &url, &shared).await {
                shared.fail(&e.context(format!("publisher {p}")));
            }
        });
    }
    let mut report = fanout::measure(&shared, &watched, publishers).await?;
    shared.done.cancel();
    let trackers = subscribers.join_all().await;
    for connection in consumers {
        let _ = connection.close(200, "benchmark done".into()).await;
    }
    fanout::summarize(&shared, trackers, &mut report);
    Ok(report)
}

async fn publisher(p: usize, url: &str, shared: &Arc<Shared>) -> anyhow::Result<()> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let window = shared.shape.window.max(1);
    let permits = Arc::new(Semaphore::new(window));
    // Confirms are awaited in publish order, each freeing a window slot.
    let (pending, mut confirms) = tokio::sync::mpsc::unbounded_channel();
    let confirmer = {
        let (shared, permits) = (shared.clone(), permits.clone());
        tokio::spawn(async move {
            while let Some((seq, confirm)) = confirms.recv().await {
                let confirm: lapin::PublisherConfirm = confirm;
                if let Confirmation::Ack(_) = confirm.await? {
                    shared.confirmed(p, seq);
                }
                permits.add_permits(1);
            }
            anyhow::Ok(())
        })
    };
    shared.wait_go().await?;
    let mut pacer = shared.pacer();
    let mut seq = 0u64;
    loop {
        if !shared.next_turn(&mut pacer, &permits).await? {
            break;
        }
        let key = &shared.keys[shared.channel_of(p, seq)];
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                shared.body(p, seq).as_bytes(),
                BasicProperties::default().with_content_type("text/plain".into()),
            )
            .await?;
        pending.send((seq, confirm))?;
        seq += 1;
    }
    drop(pending);
    tokio::time::timeout(shared.shape.drain, confirmer)
        .await
        .context("confirms still missing after the drain time")???;
    let _ = connection.close(200, "benchmark done".into()).await;
    Ok(())
}
