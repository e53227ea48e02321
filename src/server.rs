//! Serves the routes on a listener the caller bound, and shuts down in
//! order: stop accepting, tell every session, wait for them (bounded).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin;
use crate::auth::{Auth, AuthMode};
use crate::broker::Broker;
use crate::budget::Budget;
use crate::config::Config;
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use crate::presence::{self, Presence};
use crate::routes::{self, ConnectionSlot, PeerAddr, State};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_rustls::TlsAcceptor;
use warp::{hyper, Filter};

/// How often `stompgate_broker_up` is refreshed between other checks.
const BROKER_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs until `shutdown` is cancelled and the sessions have closed (or
/// `server.shutdown_timeout` has passed).
pub async fn run<B: Broker>(
    listener: TcpListener,
    config: Arc<Config>,
    broker: B,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let auth = match Auth::new(&config.auth, &config.amqp.exchange) {
        Ok(auth) => Arc::new(auth),
        Err(reason) => {
            // Config::load validated this already; a hand-built Config may not have.
            error!(%reason, "invalid auth configuration: not serving");
            return;
        }
    };
    if auth.mode() == AuthMode::None && !config.server.listen.ip().is_loopback() {
        warn!(
            listen = %config.server.listen,
            "auth.mode is \"none\": anyone who can reach this address may read and publish \
             everything; set auth.mode = \"users\" before exposing it"
        );
    }
    let sessions = TaskTracker::new();
    // Stopped after the sessions, so that their leaves are published.
    let presence_stop = CancellationToken::new();
    let (presence, agent) = match config.presence.enabled {
        true => {
            let presence = Presence::new(&config.presence);
            let agent = tokio::spawn(presence::agent::run(
                presence.clone(),
                broker.clone(),
                config.amqp.direct_exchange.clone(),
                metrics.clone(),
                presence_stop.clone(),
            ));
            (Some(presence), Some(agent))
        }
        false => (None, None),
    };
    tokio::spawn(probe_broker(broker.clone(), shutdown.clone()));
    let limits = Arc::new(ConnectionLimits::new(
        config.server.max_connections,
        config.server.max_connections_per_ip,
        config.server.ipv6_prefix_len,
    ));
    let state = Arc::new(State {
        config: config.clone(),
        broker,
        shutdown: shutdown.clone(),
        sessions: sessions.clone(),
        inbound: Budget::new(
            config.stomp.node_inbound_bytes,
            metrics.held_bytes.with_label_values(&["inbound"]),
        ),
        metrics: metrics.clone(),
        registry: Arc::new(admin::Registry::default()),
        auth,
        limits: limits.clone(),
        presence,
    });
    let tls = match crate::tls::server_config(&config.server.tls) {
        Ok(tls) => tls,
        Err(reason) => {
            // Config::load validated this already; a hand-built Config may not have.
            error!(%reason, "invalid TLS configuration: not serving");
            return;
        }
    };
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    match listener.local_addr() {
        Ok(addr) => {
            // What a newcomer looks for first: where to point a client and
            // a browser, which broker, which node.
            let web = if tls.is_some() { "https" } else { "http" };
            let brokers: Vec<String> = config
                .amqp
                .all_urls()
                .map(crate::broker::amqp::client::redacted)
                .collect();
            info!(
                demo = %format!("{web}://{addr}/"),
                broker = %brokers.join(", "),
                node_id = %config.server.node_id,
                "listening on {scheme}://{addr}/ws"
            )
        }
        Err(e) => warn!(error = %e, "listening (address unknown)"),
    }
    let routes = routes::routes(state);
    serve(
        listener,
        tls.map(TlsAcceptor::from),
        routes,
        Accepting {
            header_read_timeout: config.server.header_read_timeout,
            limits,
            metrics,
        },
        shutdown.clone(),
    )
    .await;
    sessions.close();
    info!(open = sessions.len(), "shutting down: waiting for sessions");
    let limit = config.server.shutdown_timeout;
    if tokio::time::timeout(limit, sessions.wait()).await.is_err() {
        warn!(
            open = sessions.len(),
            "sessions still open after server.shutdown_timeout"
        );
    }
    presence_stop.cancel();
    if let Some(agent) = agent {
        // Its bye: bounded like any broker call.
        let _ = tokio::time::timeout(config.amqp.call_timeout, agent).await;
    }
    info!("stopped");
}

/// Pause after a failed accept (e.g. out of file descriptors) before the
/// next.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// Failed accepts are logged at most this often, with how many were not.
const ACCEPT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Rate-limits the log of failed accepts.
#[derive(Default)]
struct AcceptFailures {
    logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn note(&mut self, error: &std::io::Error) {
        if self
            .logged
            .is_some_and(|at| at.elapsed() < ACCEPT_LOG_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        warn!(%error, unlogged = self.unlogged, "accept failed; retrying in 100 ms");
        self.logged = Some(std::time::Instant::now());
        self.unlogged = 0;
    }
}

/// Connections over a connection limit still served at once, so that a
/// WebSocket client reads the ERROR naming the limit (and `/healthz`
/// answers); past them, a connection over the limit is closed unread.
const REFUSING_AT_ONCE: usize = 64;

/// What the accept loop needs besides the routes.
struct Accepting {
    header_read_timeout: std::time::Duration,
    /// Every accepted connection takes its place here, upgraded or not.
    limits: Arc<ConnectionLimits>,
    metrics: Arc<Metrics>,
}

/// Longest a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts connections (TLS ones when `tls` is set: warp 0.4 has none of
/// its own) and serves the routes on them until `shutdown`. Each request
/// carries the client's address as [`PeerAddr`], for logs and per-address
/// limits.
async fn serve<F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    routes: F,
    accepting: Accepting,
    shutdown: CancellationToken,
) where
    F: Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
        + Clone
        + Send
        + Sync
        + 'static,
    F::Future: Send,
{
    let mut failures = AcceptFailures::default();
    let refusing = Arc::new(tokio::sync::Semaphore::new(REFUSING_AT_ONCE));
    let header_read_timeout = accepting.header_read_timeout;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    failures.note(&e);
                    // Out of file descriptors (EMFILE) does not pass in a
                    // microsecond: retrying at once would spin and flood.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                    continue;
                }
            },
        };
        // A MESSAGE goes out as soon as its session is idle; Nagle's
        // algorithm would hold it back until the client acked the last
        // one (up to a delayed ACK, tens of ms).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
        }
        // Its place under the connection limits, from now on: a client
        // that opens connections and never sends a request counts as much
        // as one whose connections are WebSockets.
        let place = accepting.limits.acquire(Some(peer.ip()));
        let refusing_turn = match &place {
            Ok(_) => None,
            Err(refusal) => match refusing.clone().try_acquire_owned() {
                Ok(turn) => Some(turn),
                Err(_) => {
                    accepting
                        .metrics
                        .refusals
                        .with_label_values(&[refusal.key()])
                        .inc();
                    tracing::debug!(%peer, limit = refusal.key(), "connection closed unread");
                    continue;
                }
            },
        };
        let slot = ConnectionSlot::new(place);
        let (tls, routes) = (tls.clone(), routes.clone());
        tokio::spawn(async move {
            let _refusing_turn = refusing_turn;
            let io = match tls {
                None => Either::Left(tcp),
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => Either::Right(stream),
                        Ok(Err(e)) => {
                            return tracing::debug!(%peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            };
            let service = warp::service(routes);
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(PeerAddr(peer));
                    request.extensions_mut().insert(slot.clone());
                    let mut service = service.clone();
                    tower_service::Service::call(&mut service, request)
                },
            );
            // HTTP/1.1 only: WebSockets upgrade from it, and TLS offers no
            // other. Its header timeout closes connections that never send
            // a request, or send one too slowly (before, they stayed open,
            // uncounted, until the node ran out of file descriptors).
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Keeps the broker's health (and its metric) fresh even when nobody asks
/// `/readyz`.
async fn probe_broker<B: Broker>(broker: B, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(BROKER_PROBE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {
                broker.probe().await;
            }
        }
    }
}
