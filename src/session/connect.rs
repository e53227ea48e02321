//! From the upgraded WebSocket to a running session: CONNECT within
//! `stomp.connect_timeout`, the version, authentication, the heart-beat
//! terms, the session's queue; then the loop, and whatever ends it, the
//! close.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use crate::admin::SessionEntry;
use crate::auth::AuthMode;
use crate::broker::{Broker, BrokerSession, Sender};
use crate::config::StompConfig;
use crate::limits::PublishRate;
use crate::metrics::Metrics;
use crate::presence::SessionPresence;
use crate::stomp::command::{self, Connect, Version};
use crate::websocket::WebSocket;

use super::acks::Acks;
use super::publishes::{InFlights, Transactions};
use super::socket::{Connection, CLOSE_GOING_AWAY, CLOSE_NORMAL};
use super::subscriptions::Subscriptions;
use super::{record_end, shutting_down, End, Session, SessionContext, SessionError};

/// Runs one WebSocket connection to its end.
pub async fn run<B: Broker>(ws: WebSocket, ctx: SessionContext<B>) {
    let id = format!("{:012x}", rand::random::<u64>() >> 16);
    let peer = ctx
        .peer
        .map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    let span = tracing::info_span!("session", session = %id, %peer);
    let _open = OpenConnection::count(ctx.metrics.clone());
    // A panic ends this session only. Unwinding drops what it holds: its
    // channel (so its exclusive queue goes), its admin entry, its
    // connection slot, and `_open` its count.
    let session =
        std::panic::AssertUnwindSafe(run_session(ws, ctx, id, peer).instrument(span.clone()));
    if let Err(panic) = session.catch_unwind().await {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        span.in_scope(|| tracing::error!(panic = what, "session panicked; only it was ended"));
    }
}

/// Counts an open WebSocket connection in `connections_open` for as long
/// as it lives, however its task ends.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn count(metrics: Arc<Metrics>) -> OpenConnection {
        metrics.connections_open.inc();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

async fn run_session<B: Broker>(ws: WebSocket, ctx: SessionContext<B>, id: String, peer: String) {
    let stomp = &ctx.config.stomp;
    let mut conn = Connection::new(ws, &ctx.config, ctx.metrics.clone(), &ctx.inbound);
    let deadline = Instant::now() + stomp.connect_timeout;
    let (connect, receipt) = tokio::select! {
        _ = ctx.shutdown.cancelled() => {
            conn.finish(Some(shutting_down()), CLOSE_GOING_AWAY).await;
            record_end(&End::Shutdown, &ctx.metrics);
            return;
        }
        first = tokio::time::timeout_at(deadline, conn.first_frame()) => match first {
            Err(_) => {
                let detail = format!(
                    "no CONNECT frame within stomp.connect_timeout ({:?})",
                    stomp.connect_timeout
                );
                let error = command::error("connect timeout", &detail, None);
                conn.refused("stomp.connect_timeout");
                conn.finish(Some(error), CLOSE_NORMAL).await;
                record_end(&End::ConnectTimeout, &ctx.metrics);
                return;
            }
            Ok(Err(end)) => {
                record_end(&end, &ctx.metrics);
                return;
            }
            Ok(Ok(frame)) => frame,
        },
    };

    let version = match negotiate(&connect, ctx.subprotocol) {
        Ok(version) => version,
        Err(error) => {
            // STOMP 1.2: the ERROR lists the versions the server supports.
            let frame = command::error(error.summary(), &error.to_string(), receipt.as_deref())
                .header("version", "1.2,1.1,1.0");
            conn.finish(Some(frame), CLOSE_NORMAL).await;
            record_end(&End::Failed, &ctx.metrics);
            return;
        }
    };
    let identity = match ctx
        .auth
        .authenticate(
            connect.login.as_deref(),
            connect.passcode.as_deref(),
            ctx.upgrade_token.as_deref(),
            ctx.peer.map(|p| p.ip()),
        )
        .await
    {
        Ok(identity) => identity,
        Err(refused) => {
            info!(login = connect.login.as_deref(), %refused, "authentication failed");
            conn.refused(refused.limit());
            let frame = command::error(refused.summary(), &refused.to_string(), receipt.as_deref());
            conn.finish(Some(frame), CLOSE_NORMAL).await;
            record_end(&End::Failed, &ctx.metrics);
            return;
        }
    };
    let broker = match ctx.broker.open(&id, false).await {
        Ok(broker) => broker,
        Err(error) => {
            warn!(%error, "could not open the session's queue");
            let end = conn.fail(error.into(), receipt.as_deref()).await;
            record_end(&end, &ctx.metrics);
            return;
        }
    };
    conn.escapes = version != Version::V1_0;
    conn.decoder.set_escapes(conn.escapes);

    let (send_every, expect_every) = heart_beats(connect.heart_beat, stomp);

    let entry = Arc::new(SessionEntry::new(
        &id,
        &peer,
        identity.user.clone(),
        version.as_str(),
        broker.queue_name(),
    ));
    conn.cut = Some(Box::pin(broker.cut_off()));
    // With auth.mode = "none" CONNECT's login is only a claim: it names
    // the session's user, but is never passed on as who sent a message.
    let authenticated = ctx.auth.mode() != AuthMode::None;
    let sender = Arc::new(Sender {
        session: id.clone(),
        user: identity.user.clone().filter(|_| authenticated),
    });
    // Shown with the user that goes with its messages, nobody's claim.
    let presence = SessionPresence::new(
        ctx.presence.clone(),
        &id,
        sender.user.clone(),
        ctx.config.presence.max_pending,
    );
    let mut session = Session {
        id,
        version,
        config: ctx.config.clone(),
        metrics: ctx.metrics.clone(),
        inbound: ctx.inbound.clone(),
        _registration: ctx.sessions.register(entry.clone()),
        entry,
        sender,
        user: identity.user.clone(),
        presence,
        grants: identity.grants,
        expires: identity.expires.map(|at| {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            Instant::now() + left
        }),
        factory: ctx.broker.clone(),
        broker: Some(broker),
        acked: false,
        ended: None,
        reconnect_at: Instant::now(),
        reconnect_failures: 0,
        opening: None,
        conn,
        subscriptions: Subscriptions::default(),
        transactions: Transactions::new(stomp, ctx.inbound.clone()),
        acks: Acks::new(u64::from(ctx.config.amqp.prefetch / 2)),
        next_message: 0,
        in_flight: InFlights::new(),
        disconnecting: None,
        rate: PublishRate::new(
            stomp.publish_rate,
            stomp.publish_burst,
            stomp.publish_bytes_rate,
            stomp.publish_bytes_burst,
        ),
        throttled_until: None,
        send_every: (send_every > 0).then(|| Duration::from_millis(send_every)),
        expect_every: (expect_every > 0).then(|| Duration::from_millis(expect_every)),
    };
    let connected = command::connected(version, (send_every, expect_every), &session.id);
    ctx.metrics
        .sessions
        .with_label_values(&[version.as_str()])
        .inc();
    let end = match session.conn.write(&connected).await {
        Ok(()) => {
            info!(
                version = version.as_str(),
                queue = %session.entry.queue,
                "session opened"
            );
            session.run(&ctx.shutdown).await
        }
        Err(end) => end,
    };
    // Boxed: closing's future (drain, release, the broker's close) is the
    // largest a session awaits, about 6 KB; held inline it would be part
    // of every session's task for as long as the session lives.
    Box::pin(session.close(end)).await;
}

fn negotiate(connect: &Connect, subprotocol: Option<Version>) -> Result<Version, SessionError> {
    match &connect.accept_version {
        Some(accepted) => Version::negotiate(accepted).ok_or_else(|| {
            SessionError::Protocol(format!(
                "no common STOMP version: client accepts {accepted:?}, server supports 1.0, 1.1, 1.2"
            ))
        }),
        // STOMP 1.0 clients send no accept-version; the subprotocol, when
        // one was negotiated, says more.
        None => Ok(subprotocol.unwrap_or(Version::V1_0)),
    }
}

/// The heart-beat periods in milliseconds, (server sends, server
/// expects), as in contract.md: the server sends as often as the client
/// asks, expects the client as often as it offered, never faster than
/// `stomp.heartbeat_min`; 0 stays 0. The ceiling keeps a client's huge
/// value from overflowing timers.
fn heart_beats((cx, cy): (u64, u64), stomp: &StompConfig) -> (u64, u64) {
    let floor = stomp.heartbeat_min.as_millis() as u64;
    let ceiling = stomp.heartbeat_max.as_millis() as u64;
    let send_every = if cy == 0 { 0 } else { cy.clamp(floor, ceiling) };
    let expect_every = if cx == 0 { 0 } else { cx.clamp(floor, ceiling) };
    (send_every, expect_every)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heart_beats_are_clamped_and_zero_stays_zero() {
        let mut stomp = crate::config::Config::defaults().unwrap().stomp;
        stomp.heartbeat_min = Duration::from_millis(1000);
        stomp.heartbeat_max = Duration::from_secs(60);
        // The client sends every 5 s and wants one every 100 ms: it gets
        // one every second, and is expected every 5 s.
        assert_eq!(heart_beats((5000, 100), &stomp), (1000, 5000));
        assert_eq!(heart_beats((0, 0), &stomp), (0, 0));
        assert_eq!(heart_beats((u64::MAX, 0), &stomp), (0, 60_000));
    }

    #[test]
    fn versions_are_negotiated_or_refused() {
        let mut connect = Connect {
            accept_version: Some("1.1,1.2".into()),
            login: None,
            passcode: None,
            heart_beat: (0, 0),
        };
        assert_eq!(negotiate(&connect, None).unwrap(), Version::V1_2);
        connect.accept_version = Some("2.0".into());
        assert!(matches!(
            negotiate(&connect, None),
            Err(SessionError::Protocol(_))
        ));
        // STOMP 1.0 sends none: the WebSocket subprotocol may say more.
        connect.accept_version = None;
        assert_eq!(negotiate(&connect, None).unwrap(), Version::V1_0);
        assert_eq!(
            negotiate(&connect, Some(Version::V1_1)).unwrap(),
            Version::V1_1
        );
    }
}
