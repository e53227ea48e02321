//! The connection's writer task: flushes what the channels queued in the
//! outbox, sends heart-beats, and when the connection ends says goodbye
//! with `connection.close`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{connection, AMQPClass};
use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::frames::{Outbox, FRAME_END, FRAME_HEARTBEAT};
use super::{lock, Inner, CLOSE_WAIT};

/// Writes what sessions queued, in batches, and heart-beats when idle.
/// A write stuck on a broker that stopped reading is abandoned as soon as
/// the connection is declared dead.
pub(super) async fn write_loop(
    inner: Arc<Inner>,
    mut writer: impl AsyncWrite + Unpin,
    heartbeat: Option<Duration>,
) {
    let interval = heartbeat.map_or(Duration::from_secs(3600), |h| h / 2);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut spare = BytesMut::new();
    let mut wrote = false;
    loop {
        tokio::select! {
            () = inner.queued.notified() => {}
            _ = ticks.tick(), if heartbeat.is_some() => {
                if !std::mem::take(&mut wrote) {
                    spare.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
                }
            }
            () = inner.stop.cancelled() => {
                let _ = tokio::time::timeout(CLOSE_WAIT, goodbye(&inner, &mut writer)).await;
                return;
            }
        }
        {
            let mut outbox = lock(&inner.outbox);
            if spare.is_empty() {
                std::mem::swap(&mut outbox.bytes, &mut spare);
            } else {
                spare.extend_from_slice(&outbox.bytes);
                outbox.bytes.clear();
            }
            inner.queued_bytes.store(0, Ordering::Relaxed);
        }
        inner.drained.notify_waiters();
        if spare.is_empty() {
            continue;
        }
        wrote = true;
        let written = async {
            writer.write_all(&spare).await?;
            writer.flush().await
        };
        tokio::select! {
            written = written => {
                if let Err(e) = written {
                    inner.fail(format!("writing to the broker: {e}"));
                    return;
                }
            }
            () = inner.stop.cancelled() => return,
        }
        spare.clear();
    }
}

/// The last writes of a connection that is ending: what was queued (a
/// close-ok for the broker's close), then, when the gateway itself is
/// closing it, `connection.close`.
pub(super) async fn goodbye(inner: &Inner, writer: &mut (impl AsyncWrite + Unpin)) {
    let mut last = std::mem::take(&mut lock(&inner.outbox).bytes);
    if lock(&inner.failure).is_none() {
        let mut close = Outbox::default();
        close.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "stompgate closing".into(),
                class_id: 0,
                method_id: 0,
            })),
        );
        last.extend_from_slice(&close.bytes);
    }
    let _ = writer.write_all(&last).await;
    let _ = writer.flush().await;
}
