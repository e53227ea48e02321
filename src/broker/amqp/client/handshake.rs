//! Opening a connection: TCP (no delay, keepalive, `TCP_USER_TIMEOUT`) or
//! TLS, the protocol header, PLAIN login, tuning (frame size, channels,
//! heart-beat) and the virtual host's open.

use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::connection;
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amq_protocol::uri::AMQPUri;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::frames::{read_method, write_method, PROTOCOL_HEADER};
use super::{Options, Stream, CHANNEL_MAX, FRAME_MAX};

/// Without heart-beats (`?heartbeat=0`), how long the kernel may hold
/// unacknowledged writes before it gives the connection up.
pub(super) const USER_TIMEOUT_WITHOUT_HEARTBEAT: Duration = Duration::from_secs(30);

/// A URL's user, host and virtual host, without its password: for logs.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(an unparsable URL)".into(),
    }
}

/// Keepalive and `TCP_USER_TIMEOUT` on the broker socket: a write the
/// kernel cannot deliver, or a peer gone without a word, ends the socket
/// even when no heart-beat is due.
pub(super) fn guard_socket(tcp: &TcpStream, heartbeat: u16) {
    let _ = tcp.set_nodelay(true);
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive on the broker socket");
    }
    let user_timeout = match heartbeat {
        0 => USER_TIMEOUT_WITHOUT_HEARTBEAT,
        h => Duration::from_secs(u64::from(h) * 2),
    };
    if let Err(e) = socket.set_tcp_user_timeout(Some(user_timeout)) {
        tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT on the broker socket");
    }
}

pub(super) struct Tuned {
    pub(super) channel_max: u16,
    pub(super) frame_max: u32,
    pub(super) heartbeat: u16,
}

pub(super) async fn handshake(
    stream: &mut Box<dyn Stream>,
    buf: &mut BytesMut,
    uri: &AMQPUri,
    options: &Options,
    heartbeat: u16,
) -> Result<Tuned, String> {
    stream
        .write_all(PROTOCOL_HEADER)
        .await
        .map_err(|e| e.to_string())?;
    let connection::AMQPMethod::Start(_) = read_method(stream, buf).await? else {
        return Err("the broker did not start the handshake".into());
    };
    let mut capabilities = FieldTable::default();
    for capability in [
        "publisher_confirms",
        "consumer_cancel_notify",
        "basic.nack",
        "connection.blocked",
        // Without it RabbitMQ drops a failed login without saying why.
        "authentication_failure_close",
    ] {
        capabilities.insert(capability.into(), AMQPValue::Boolean(true));
    }
    let mut properties = FieldTable::default();
    properties.insert("product".into(), AMQPValue::LongString("stompgate".into()));
    properties.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    properties.insert(
        "connection_name".into(),
        AMQPValue::LongString(options.name.as_str().into()),
    );
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let user = &uri.authority.userinfo;
    let response = format!("\0{}\0{}", user.username, user.password);
    write_method(
        stream,
        connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: properties,
            mechanism: "PLAIN".into(),
            response: LongString::from(response.as_bytes()),
            locale: "en_US".into(),
        }),
    )
    .await?;
    let connection::AMQPMethod::Tune(tune) = read_method(stream, buf).await? else {
        return Err("the broker did not tune the connection".into());
    };
    let pick = |server: u32, ours: Option<u32>, most: u32| {
        let server = if server == 0 { most } else { server.min(most) };
        ours.map_or(server, |o| o.min(server))
    };
    let tuned = Tuned {
        channel_max: pick(
            tune.channel_max.into(),
            uri.query.channel_max.map(u32::from),
            CHANNEL_MAX.into(),
        ) as u16,
        frame_max: pick(tune.frame_max, uri.query.frame_max, FRAME_MAX),
        // Ours, not the broker's 60 s: a dead broker must be noticed
        // before a SEND's amqp.publish_timeout runs out.
        heartbeat,
    };
    write_method(
        stream,
        connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tuned.channel_max,
            frame_max: tuned.frame_max,
            heartbeat: tuned.heartbeat,
        }),
    )
    .await?;
    write_method(
        stream,
        connection::AMQPMethod::Open(connection::Open {
            virtual_host: uri.vhost.as_str().into(),
        }),
    )
    .await?;
    let connection::AMQPMethod::OpenOk(_) = read_method(stream, buf).await? else {
        return Err("the broker did not open the virtual host".into());
    };
    Ok(tuned)
}

pub(super) async fn tls(
    tcp: TcpStream,
    host: &str,
    config: Option<Arc<rustls::ClientConfig>>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = match config {
        Some(config) => config,
        None => system_tls()?,
    };
    let server = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(server, tcp)
        .await
        .map_err(|e| format!("TLS to {host}: {e}"))
}

/// TLS that trusts the system's CA certificates, without a client
/// certificate.
pub(super) fn system_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
