//! Serves the routes on a listener the caller bound, and shuts down in
//! order: stop accepting, tell every session, wait for them (bounded).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::config::Config;
use crate::routes::{self, State};

/// Runs until `shutdown` is cancelled and the sessions have closed (or
/// `server.shutdown_timeout` has passed).
pub async fn run<B: Broker>(
    listener: TcpListener,
    config: Arc<Config>,
    broker: B,
    shutdown: CancellationToken,
) {
    let sessions = TaskTracker::new();
    let state = Arc::new(State {
        config: config.clone(),
        broker,
        shutdown: shutdown.clone(),
        sessions: sessions.clone(),
    });
    match listener.local_addr() {
        Ok(addr) => info!(%addr, node_id = %config.server.node_id, "listening on ws://{addr}/ws"),
        Err(e) => warn!(error = %e, "listening (address unknown)"),
    }
    warp::serve(routes::routes(state))
        .incoming(listener)
        .graceful(shutdown.clone().cancelled_owned())
        .run()
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
    info!("stopped");
}
