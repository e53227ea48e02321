//! stompgate: STOMP 1.2 over WebSocket in front of RabbitMQ.
//!
//! Each WebSocket connection gets its own exclusive RabbitMQ queue; each
//! SUBSCRIBE binds that queue to a topic exchange, each SEND publishes to
//! it. RabbitMQ does the routing and fan-out, so gateway nodes share
//! nothing and any number of them can run side by side.
//!
//! # Layout
//!
//! The path of a message, in module order:
//!
//! - [`config`]: settings, layered default.toml → `--config` → env.
//! - [`auth`]: who may connect, and which destinations each may use.
//! - [`server`]: binds, serves the routes (over [`tls`] when configured),
//!   tracks sessions, drains on shutdown.
//! - [`routes`]: `/ws` upgrade with subprotocol and origin checks, health,
//!   metrics, admin and the demo page.
//! - [`websocket`]: the upgrade itself, with the socket's buffers sized.
//! - [`session`]: one task per WebSocket, from CONNECT to close. `mod.rs`
//!   holds the loop, each event handed to a room: `connect` (CONNECT,
//!   authentication, heart-beat terms), `socket` (the client's WebSocket),
//!   `subscriptions`, `deliveries` (queue → MESSAGE frames, the move to
//!   acks), `acks`, `publishes` (SENDs, receipts, transactions),
//!   `recovery` (broker loss) and `deadlines` (the loop's timers as one).
//! - [`stomp`]: frame codec and client commands.
//! - [`destination`]: `/topic/no01` → exchange and routing key; topic matching;
//!   addressed destinations (`/user/…`, `/session/…`).
//! - [`budget`]: the node-wide byte budgets that bound many clients together;
//!   [`limits`]: connection limits and the publish rate.
//! - [`broker`]: the port the session talks to, and its RabbitMQ adapter
//!   (`broker::amqp`: the connection pool; `session`, one session's queue
//!   and channel; `headers`, STOMP headers ↔ AMQP properties). Under it the
//!   AMQP client, `broker::amqp::client`, which runs on the sessions' own
//!   runtime: `handshake`, `frames` (with the hand-read hot frames in
//!   `wire`), `reader` and `writer` (a connection's two tasks), `handle`
//!   (a session's channel) and `holding` (delivery bytes held).
//! - [`metrics`] and [`admin`]: what operators see (`/metrics`, `/admin/sessions`).

pub mod admin;
pub mod auth;
pub mod broker;
pub mod budget;
pub mod config;
pub mod destination;
pub mod limits;
pub mod metrics;
pub mod presence;
pub mod routes;
pub mod server;
pub mod session;
pub mod stomp;
pub mod tls;
pub mod websocket;
