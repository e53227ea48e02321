//! Settings: `config/default.toml` (embedded), then an optional `--config`
//! file, then `STOMPGATE__<SECTION>__<KEY>` environment variables.
//!
//! Every struct refuses unknown keys, so a typo fails at start with the name
//! of the key instead of being silently ignored.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Auth, AuthConfig};

/// The defaults, compiled in so the binary runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub stomp: StompConfig,
    pub amqp: AmqpConfig,
    pub auth: AuthConfig,
    pub presence: PresenceConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Empty until [`Config::validate`] derives one.
    pub node_id: String,
    pub allowed_origins: Vec<String>,
    pub max_message_bytes: usize,
    pub read_buffer_bytes: usize,
    /// Threads running sessions; 0 = one per CPU core.
    pub worker_threads: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Bearer token for `/admin/sessions`; empty disables the endpoint.
    pub admin_token: String,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// IPv6 clients count toward `max_connections_per_ip` by this prefix.
    pub ipv6_prefix_len: u8,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    pub tls: TlsConfig,
}

/// `wss://` served by the gateway itself; both empty: plain `ws://`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StompConfig {
    pub max_frame_bytes: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_subscriptions: usize,
    pub max_transactions: usize,
    pub max_transaction_frames: usize,
    pub max_transaction_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_min: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_max: Duration,
    #[serde(with = "humantime_serde")]
    pub slow_client_timeout: Duration,
    pub max_unconfirmed: usize,
    pub publish_rate: u32,
    pub publish_burst: u32,
    /// Bytes of SEND frames per second, and the burst, per connection.
    pub publish_bytes_rate: u64,
    pub publish_bytes_burst: u64,
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// Bytes of frames begun and transactions held, all clients together.
    pub node_inbound_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: String,
    /// More brokers (a cluster's other nodes), tried after `url` in turn.
    pub urls: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    pub queue_max_length: u32,
    /// Bytes of message bodies a session's queue may hold.
    pub queue_max_bytes: u64,
    pub queue_overflow: Overflow,
    /// Exchanges `/exchange/<name>/…` may name; "*" allows any.
    pub allowed_exchanges: Vec<String>,
    pub exchange: String,
    /// The direct exchange behind addressed messages (`/user/…`,
    /// `/session/…`), declared by the gateway.
    pub direct_exchange: String,
    pub prefetch: u16,
    /// Bytes of deliveries one session, and all sessions, hold at once.
    pub prefetch_bytes: usize,
    pub node_prefetch_bytes: usize,
    pub no_ack_max_body: usize,
    pub pool_size: usize,
    pub sessions_per_connection: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// AMQP heart-beat asked of the broker unless the URL sets one.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Longest wait for the broker's reply to a channel, queue or binding
    /// method.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    pub tls: AmqpTlsConfig,
}

/// What `amqps://` trusts and shows, beyond the system's CA certificates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpTlsConfig {
    /// PEM file of CA certificates trusted for the broker (a private CA);
    /// empty: the system's.
    pub ca_file: String,
    /// PEM client certificate chain and its key, for brokers that ask for
    /// one (`ssl_options.fail_if_no_peer_cert`); both or neither.
    pub cert_file: String,
    pub key_file: String,
}

/// `/presence/<key>`: who reads a key, across nodes (see [`crate::presence`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceConfig {
    /// Off: no node traffic, and `/presence/` subscriptions are refused.
    pub enabled: bool,
    /// How often each node tells the others it is alive.
    #[serde(with = "humantime_serde")]
    pub beat_interval: Duration,
    /// A node not heard from for this long is gone: its members leave.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// Longest a first watcher of a key waits for the other nodes' members
    /// before its snapshot goes out with what came.
    #[serde(with = "humantime_serde")]
    pub snapshot_timeout: Duration,
    /// Members of one key a node lists (in snapshots, and in the events
    /// it passes on); past it the key's presence is truncated.
    pub max_members: usize,
    /// Presence MESSAGEs waiting for one session to write them; past it
    /// the session ends as too slow.
    pub max_pending: usize,
    /// Joins and leaves waiting for this node's agent to publish them;
    /// past it they are dropped and the other nodes ask again.
    pub max_outbox: usize,
}

/// What RabbitMQ does when a session's queue is full (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Drop the oldest messages: a stuck reader loses old news, not new.
    DropHead,
    /// Refuse new messages (publishers see them as not routed to this queue).
    RejectPublish,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
        }
    }
}

impl AmqpConfig {
    /// Whether `/exchange/<name>/…` may use this exchange. The exchange
    /// behind /topic/, /sub/ and /pub/ always may.
    pub fn exchange_allowed(&self, name: &str) -> bool {
        // The direct exchange carries addressed messages and presence, which
        // only the gateway routes: `*` does not open it to `/exchange/`.
        if name == self.direct_exchange {
            return false;
        }
        name == self.exchange || self.allowed_exchanges.iter().any(|a| a == "*" || a == name)
    }

    /// Every broker to try, `url` first.
    pub fn all_urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.urls.iter().map(String::as_str))
    }
}

/// Settings that are lists: from the environment, comma-separated
/// (`a,b`) or a JSON array of strings (`["a","b"]`).
const LIST_KEYS: [&str; 3] = [
    "server.allowed_origins",
    "amqp.urls",
    "amqp.allowed_exchanges",
];

/// The environment with every list setting given as a JSON array turned
/// into the comma-separated form the loader splits.
fn lists_as_commas(
    mut env: std::collections::HashMap<String, String>,
) -> Result<std::collections::HashMap<String, String>, ConfigError> {
    for (name, value) in env.iter_mut() {
        let Some(setting) = name.strip_prefix("STOMPGATE__") else {
            continue;
        };
        let setting = setting.to_ascii_lowercase().replace("__", ".");
        let Some(key) = LIST_KEYS.into_iter().find(|k| *k == setting) else {
            continue;
        };
        if !value.trim_start().starts_with('[') {
            continue;
        }
        let items: Vec<String> = serde_json::from_str(value).map_err(|e| ConfigError::Invalid {
            key,
            reason: format!(
                "{name} looks like a JSON array but is not one of strings ({e}); \
                 or give a comma-separated list"
            ),
        })?;
        if let Some(bad) = items.iter().find(|i| i.contains(',')) {
            return Err(ConfigError::Invalid {
                key,
                reason: format!("{bad:?}: an item of a list setting cannot contain a comma"),
            });
        }
        *value = items.join(",");
    }
    Ok(env)
}

impl Config {
    /// Loads the layered configuration, reading the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, None)
    }

    /// Like [`Config::load`], with the environment given explicitly (`None`
    /// reads the process environment); tests use this to stay independent.
    pub fn load_from(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env = lists_as_commas(env.unwrap_or_else(|| std::env::vars().collect()))?;
        let env = config::Environment::with_prefix("STOMPGATE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key(LIST_KEYS[0])
            .with_list_parse_key(LIST_KEYS[1])
            .with_list_parse_key(LIST_KEYS[2])
            .source(Some(env));
        let config: Config = builder.add_source(env).build()?.try_deserialize()?;
        config.validate()
    }

    /// The defaults alone, validated: the starting point for tests.
    pub fn defaults() -> Result<Config, ConfigError> {
        Self::load_from(None, Some(Default::default()))
    }

    fn validate(mut self) -> Result<Config, ConfigError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        // An empty variable (or `[]`) is an empty list, not one empty item.
        for list in [
            &mut self.server.allowed_origins,
            &mut self.amqp.urls,
            &mut self.amqp.allowed_exchanges,
        ] {
            list.retain(|item| !item.trim().is_empty());
        }
        let uri: Result<amq_protocol::uri::AMQPUri, _> = self.amqp.url.parse();
        if let Err(reason) = uri {
            return Err(invalid("amqp.url", format!("not an AMQP URL: {reason}")));
        }
        for url in &self.amqp.urls {
            if let Err(reason) = url.parse::<amq_protocol::uri::AMQPUri>() {
                return Err(invalid(
                    "amqp.urls",
                    format!("{url:?}: not an AMQP URL: {reason}"),
                ));
            }
        }
        if self.amqp.reconnect_max < self.amqp.reconnect_min {
            return Err(invalid(
                "amqp.reconnect_max",
                "must not be below amqp.reconnect_min",
            ));
        }
        if self.amqp.queue_max_length == 0 {
            return Err(invalid("amqp.queue_max_length", "must be at least 1"));
        }
        if self.amqp.queue_max_bytes == 0 || self.amqp.queue_max_bytes > i64::MAX as u64 {
            return Err(invalid("amqp.queue_max_bytes", "must be at least 1"));
        }
        if self.amqp.exchange.is_empty() || self.amqp.exchange.len() > 255 {
            return Err(invalid("amqp.exchange", "must be 1 to 255 bytes"));
        }
        let direct = &self.amqp.direct_exchange;
        if direct.is_empty() || direct.len() > 255 || direct.starts_with("amq.") {
            return Err(invalid(
                "amqp.direct_exchange",
                "must be 1 to 255 bytes, and not an amq.* exchange (the gateway declares it)",
            ));
        }
        let p = &self.presence;
        if p.beat_interval.is_zero() {
            return Err(invalid("presence.beat_interval", "must be above 0"));
        }
        if p.node_timeout < p.beat_interval * 2 {
            return Err(invalid(
                "presence.node_timeout",
                "must be at least twice presence.beat_interval, or one late beat ends a node",
            ));
        }
        for (key, value) in [
            ("presence.max_members", p.max_members),
            ("presence.max_pending", p.max_pending),
            ("presence.max_outbox", p.max_outbox),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.amqp.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        if self.amqp.pool_size == 0 {
            return Err(invalid("amqp.pool_size", "must be at least 1"));
        }
        if !(1..=2047).contains(&self.amqp.sessions_per_connection) {
            return Err(invalid(
                "amqp.sessions_per_connection",
                "must be from 1 to 2047 (RabbitMQ's largest channel_max)",
            ));
        }
        let s = &self.stomp;
        for (key, value) in [
            ("stomp.max_frame_bytes", s.max_frame_bytes),
            ("stomp.max_headers", s.max_headers),
            ("stomp.max_header_bytes", s.max_header_bytes),
            ("stomp.max_subscriptions", s.max_subscriptions),
            ("stomp.max_transactions", s.max_transactions),
            ("stomp.max_transaction_frames", s.max_transaction_frames),
            ("stomp.max_transaction_bytes", s.max_transaction_bytes),
            ("stomp.max_unconfirmed", s.max_unconfirmed),
            ("server.max_message_bytes", self.server.max_message_bytes),
            ("server.max_connections", self.server.max_connections),
            (
                "server.max_connections_per_ip",
                self.server.max_connections_per_ip,
            ),
            ("stomp.publish_rate", s.publish_rate as usize),
            ("stomp.publish_burst", s.publish_burst as usize),
            ("stomp.publish_bytes_rate", s.publish_bytes_rate as usize),
            ("stomp.publish_bytes_burst", s.publish_bytes_burst as usize),
            ("stomp.node_inbound_bytes", s.node_inbound_bytes),
            ("amqp.prefetch_bytes", self.amqp.prefetch_bytes),
            ("amqp.node_prefetch_bytes", self.amqp.node_prefetch_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (key, value) in [
            ("stomp.connect_timeout", s.connect_timeout),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("stomp.heartbeat_min", s.heartbeat_min),
            ("stomp.slow_client_timeout", s.slow_client_timeout),
            ("stomp.frame_timeout", s.frame_timeout),
            ("amqp.connect_timeout", self.amqp.connect_timeout),
            ("amqp.publish_timeout", self.amqp.publish_timeout),
            ("amqp.call_timeout", self.amqp.call_timeout),
            ("amqp.reconnect_min", self.amqp.reconnect_min),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0"));
            }
        }
        if s.heartbeat_max < s.heartbeat_min || s.heartbeat_max > Duration::from_secs(86_400) {
            return Err(invalid(
                "stomp.heartbeat_max",
                "must be between stomp.heartbeat_min and 24h",
            ));
        }
        if self.server.allowed_origins.is_empty() {
            return Err(invalid(
                "server.allowed_origins",
                "empty: no browser could connect; use [\"*\"] to allow all",
            ));
        }
        if !(1..=128).contains(&self.server.ipv6_prefix_len) {
            return Err(invalid("server.ipv6_prefix_len", "must be 1 to 128"));
        }
        if self.amqp.heartbeat > Duration::from_secs(u64::from(u16::MAX)) {
            return Err(invalid("amqp.heartbeat", "must be at most 65535s"));
        }
        if self.amqp.heartbeat.subsec_nanos() != 0 {
            return Err(invalid("amqp.heartbeat", "AMQP counts it in whole seconds"));
        }
        if let Err(reason) = crate::tls::amqp_client_config(&self.amqp.tls) {
            return Err(invalid("amqp.tls", reason));
        }
        if let Err(reason) = crate::tls::server_config(&self.server.tls) {
            return Err(invalid("server.tls", reason));
        }
        if let Err(reason) = Auth::new(&self.auth, &self.amqp.exchange) {
            return Err(invalid("auth", reason));
        }
        if self.server.node_id.is_empty() {
            self.server.node_id = derived_node_id();
        }
        // The node id is part of queue names (at most 255 bytes in AMQP,
        // with room left for the prefix and the session id).
        let id = &self.server.node_id;
        if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "server.node_id",
                "must be at most 128 printable ASCII characters without spaces",
            ));
        }
        Ok(self)
    }
}

/// `<hostname>-<4 random hex digits>`: readable in the management UI, and
/// unique per process even when several run on one host.
fn derived_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(64)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    format!("{host}-{:04x}", rand::random::<u16>())
}
