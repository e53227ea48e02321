//! HTTP routes: the `/ws` upgrade (STOMP subprotocol negotiation, origin
//! check, message size limit), `/healthz`, `/readyz`, `/metrics`,
//! `/admin/sessions` (bearer token) and the demo page at `/`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{self, Reply, Response};
use warp::{Filter, Rejection};

use crate::admin;
use crate::auth::Auth;
use crate::broker::{Broker, Readiness};
use crate::budget::Budget;
use crate::config::Config;
use crate::limits::{ConnectionLimits, Permit, Refusal};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::session::{self, SessionContext};
use crate::stomp::command::Version;
use crate::websocket::{self, WebSocketConfig};

/// What every route handler shares.
pub struct State<B> {
    pub config: Arc<Config>,
    pub broker: B,
    pub shutdown: CancellationToken,
    /// Sessions, so shutdown can wait for them: warp's graceful shutdown
    /// does not see upgraded connections.
    pub sessions: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// Live sessions for `/admin/sessions`.
    pub registry: Arc<admin::Registry>,
    pub limits: Arc<ConnectionLimits>,
    pub auth: Arc<Auth>,
    /// `stomp.node_inbound_bytes`: what all clients' unfinished frames
    /// and open transactions may hold.
    pub inbound: Arc<Budget>,
    /// None when presence.enabled is off.
    pub presence: Option<Arc<Presence>>,
}

const DEMO_PAGE: &str = include_str!("../static/index.html");
const STOMPJS: &str = include_str!("../static/stomp.umd.min.js");
const STOMPJS_LICENSE: &str = include_str!("../static/stompjs-LICENSE");

pub fn routes<B: Broker>(
    state: Arc<State<B>>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };
    let ws = warp::path("ws")
        .and(warp::path::end())
        .and(websocket::upgrade())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::headers_cloned())
        .and(peer_addr())
        .and(warp::ext::optional::<ConnectionSlot>())
        .and(with_state.clone())
        .map(upgrade);
    let healthz = warp::path("healthz")
        .and(warp::path::end())
        .and(warp::get())
        .map(|| reply::with_status("ok\n", StatusCode::OK).into_response());
    let readyz = warp::path("readyz")
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: Arc<State<B>>| {
            if state.shutdown.is_cancelled() {
                return reply::with_status("shutting down\n", StatusCode::SERVICE_UNAVAILABLE)
                    .into_response();
            }
            // State, not a probe: answers at once even while the broker hangs.
            match state.broker.readiness() {
                Readiness::Ready => reply::with_status("ready\n".to_owned(), StatusCode::OK),
                Readiness::Starting => reply::with_status(
                    "connecting to the broker\n".to_owned(),
                    StatusCode::SERVICE_UNAVAILABLE,
                ),
                Readiness::Unavailable(why) => reply::with_status(
                    format!("broker unavailable: {why}\n"),
                    StatusCode::SERVICE_UNAVAILABLE,
                ),
            }
            .into_response()
        });
    let metrics = warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: Arc<State<B>>| {
            // What /readyz would answer now, read from state at the scrape.
            let ready =
                !state.shutdown.is_cancelled() && state.broker.readiness() == Readiness::Ready;
            state.metrics.ready.set(i64::from(ready));
            reply::with_header(
                state.metrics.render(),
                "content-type",
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .into_response()
        });
    let admin = warp::path!("admin" / "sessions")
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .and(with_state)
        .map(admin_sessions);
    let page = |body: &'static str, content_type: &'static str| {
        move || reply::with_header(body, "content-type", content_type).into_response()
    };
    let demo = warp::path::end()
        .and(warp::get())
        .map(page(DEMO_PAGE, "text/html; charset=utf-8"));
    let stompjs = warp::path!("static" / "stomp.umd.min.js")
        .and(warp::get())
        .map(page(STOMPJS, "text/javascript; charset=utf-8"));
    let license = warp::path!("static" / "stompjs-LICENSE")
        .and(warp::get())
        .map(page(STOMPJS_LICENSE, "text/plain; charset=utf-8"));
    ws.or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .or(admin)
        .unify()
        .or(demo)
        .unify()
        .or(stompjs)
        .unify()
        .or(license)
        .unify()
}

/// `GET /admin/sessions`: 404 unless `server.admin_token` is set, then
/// 401 without the right `Authorization: Bearer <token>`.
fn admin_sessions<B>(authorization: Option<String>, state: Arc<State<B>>) -> Response {
    let token = &state.config.server.admin_token;
    if token.is_empty() {
        return reply::with_status("not found\n", StatusCode::NOT_FOUND).into_response();
    }
    let offered = authorization
        .as_deref()
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !constant_time_eq(offered.as_bytes(), token.as_bytes()) {
        let refused =
            reply::with_status("missing or wrong bearer token\n", StatusCode::UNAUTHORIZED);
        return reply::with_header(refused, "www-authenticate", "Bearer").into_response();
    }
    reply::json(&state.registry.snapshot()).into_response()
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn upgrade<B: Broker>(
    ws: Result<websocket::Upgrade, &'static str>,
    query: HashMap<String, String>,
    headers: HeaderMap,
    peer: Option<SocketAddr>,
    slot: Option<ConnectionSlot>,
    state: Arc<State<B>>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(why) => return reply::with_status(why, StatusCode::BAD_REQUEST).into_response(),
    };
    if state.shutdown.is_cancelled() {
        return reply::with_status("server shutting down\n", StatusCode::SERVICE_UNAVAILABLE)
            .into_response();
    }
    // Sessions already open ride out a broker outage; new ones would only
    // wait for it, so they are turned away with the reason.
    // A gateway still starting lets the session's own opening connect.
    if let Readiness::Unavailable(why) = state.broker.readiness() {
        return reply::with_status(
            format!("broker unavailable: {why}; try again shortly\n"),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .into_response();
    }
    if let Some(origin) = headers.get("origin") {
        let origin = origin.to_str().unwrap_or_default();
        if !origin_allowed(&state.config.server.allowed_origins, origin) {
            tracing::info!(origin, ?peer, "WebSocket refused: origin not allowed");
            return reply::with_status(
                "origin not allowed (server.allowed_origins)\n",
                StatusCode::FORBIDDEN,
            )
            .into_response();
        }
    }
    let subprotocol = pick_subprotocol(&headers);
    // A client that offered no STOMP subprotocol (stomp.py) still gets
    // STOMP; the version then comes from CONNECT's accept-version.
    let named = subprotocol.map(Version::subprotocol);
    let server = &state.config.server;
    let config = WebSocketConfig::default()
        .read_buffer_size(server.read_buffer_bytes)
        .max_message_size(Some(server.max_message_bytes))
        .max_frame_size(Some(server.max_message_bytes));
    // The connection's place was taken when it was accepted (so that
    // connections that never upgrade count too); the session keeps it.
    let place = slot
        .and_then(|slot| slot.take())
        .unwrap_or_else(|| state.limits.acquire(peer.map(|p| p.ip())));
    match place {
        Ok(permit) => {
            let ctx = SessionContext {
                config: state.config.clone(),
                broker: state.broker.clone(),
                peer,
                subprotocol,
                shutdown: state.shutdown.clone(),
                metrics: state.metrics.clone(),
                sessions: state.registry.clone(),
                auth: state.auth.clone(),
                inbound: state.inbound.clone(),
                upgrade_token: upgrade_token(&headers, query),
                presence: state.presence.clone(),
            };
            let sessions = state.sessions.clone();
            ws.reply(config, named, move |socket| {
                sessions.track_future(async move {
                    session::run(socket, ctx).await;
                    drop(permit);
                })
            })
        }
        // Upgraded all the same, so a STOMP client reads the ERROR that
        // names the limit instead of a bare failed handshake.
        Err(refusal) => {
            tracing::info!(
                ?peer,
                limit = refusal.key(),
                "WebSocket refused: connection limit"
            );
            let websocket_config = config;
            let (config, metrics) = (state.config.clone(), state.metrics.clone());
            let inbound = state.inbound.clone();
            ws.reply(websocket_config, named, move |socket| async move {
                session::refuse(socket, &config, metrics, &inbound, refusal).await
            })
        }
    }
}

/// A bearer token from the upgrade request: the `Authorization` header,
/// else the `access_token` query parameter (browsers cannot set headers on
/// a WebSocket).
fn upgrade_token(headers: &HeaderMap, mut query: HashMap<String, String>) -> Option<String> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .or_else(|| query.remove("access_token"))
}

/// The client's address, put on each request by the gateway's own accept
/// loop (`server::serve`).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The connection's place under server.max_connections and
/// max_connections_per_ip, taken by the accept loop: a WebSocket upgrade
/// moves it into its session (or, refused, answers with the ERROR that
/// names the limit); otherwise it goes with the connection.
#[derive(Clone)]
pub struct ConnectionSlot(Arc<std::sync::Mutex<Option<Result<Permit, Refusal>>>>);

impl ConnectionSlot {
    pub fn new(place: Result<Permit, Refusal>) -> ConnectionSlot {
        ConnectionSlot(Arc::new(std::sync::Mutex::new(Some(place))))
    }

    fn take(&self) -> Option<Result<Permit, Refusal>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

fn peer_addr(
) -> impl Filter<Extract = (Option<SocketAddr>,), Error = std::convert::Infallible> + Clone {
    warp::ext::optional::<PeerAddr>().map(|peer: Option<PeerAddr>| peer.map(|p| p.0))
}

fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

/// The highest STOMP version among the offered subprotocols (the header
/// may be repeated, each a comma-separated list).
fn pick_subprotocol(headers: &HeaderMap) -> Option<Version> {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| Version::from_subprotocol(name.trim()))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_offered_subprotocol_wins() {
        let mut headers = HeaderMap::new();
        headers.append(
            "sec-websocket-protocol",
            "v10.stomp, v11.stomp".parse().unwrap(),
        );
        headers.append("sec-websocket-protocol", "v12.stomp".parse().unwrap());
        assert_eq!(pick_subprotocol(&headers), Some(Version::V1_2));
        let mut other = HeaderMap::new();
        other.append("sec-websocket-protocol", "mqtt".parse().unwrap());
        assert_eq!(pick_subprotocol(&other), None);
    }

    #[test]
    fn origins() {
        let list = vec!["https://news.example".to_owned()];
        assert!(origin_allowed(&list, "https://NEWS.example"));
        assert!(!origin_allowed(&list, "https://evil.example"));
        assert!(origin_allowed(&["*".to_owned()], "https://evil.example"));
    }
}
