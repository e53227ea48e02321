//! wss:// served by the gateway itself (server.tls): STOMP works over it,
//! and per-address limits still see the client's address.

mod common;

use std::sync::Arc;

use common::{openssl, unique, Gateway, WAIT};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Opens wss://localhost:port/ws trusting `cert`, and returns the socket.
async fn open_wss(
    gw: &Gateway,
    cert: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the gateway");
    let mut request = format!("wss://localhost:{}/ws", gw.addr.port())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "v12.stomp".parse().unwrap());
    let (ws, response) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("WebSocket over TLS");
    assert_eq!(response.headers()["sec-websocket-protocol"], "v12.stomp");
    ws
}

async fn next_text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(text))) if text.as_str() != "\n" => return text.to_string(),
            Some(Ok(Message::Text(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn stomp_over_wss_with_limits_by_address() {
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    // A test CA, and a leaf certificate for localhost signed by it.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=stompgate test CA",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &path("key.pem"),
        "-out",
        &path("leaf.csr"),
    ]);
    std::fs::write(
        path("leaf.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("leaf.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &path("leaf.ext"),
        "-out",
        &path("cert.pem"),
    ]);
    let (cert, key) = (path("cert.pem"), path("key.pem"));
    let gw = Gateway::start_with(|c| {
        c.server.tls.cert = cert;
        c.server.tls.key = key;
        c.server.max_connections_per_ip = 1;
    })
    .await;

    let mut ws = open_wss(&gw, &path("ca.pem")).await;
    ws.send(Message::text("CONNECT\naccept-version:1.2\nhost:/\n\n\0"))
        .await
        .unwrap();
    assert!(next_text(&mut ws).await.starts_with("CONNECTED\n"));
    let key = unique("wss");
    ws.send(Message::text(format!(
        "SUBSCRIBE\nid:0\ndestination:/topic/{key}\nreceipt:s\n\n\0SEND\ndestination:/topic/{key}\n\nsecret\0"
    )))
    .await
    .unwrap();
    assert!(next_text(&mut ws)
        .await
        .starts_with("RECEIPT\nreceipt-id:s\n"));
    let message = next_text(&mut ws).await;
    assert!(
        message.starts_with("MESSAGE\n") && message.ends_with("\n\nsecret\0"),
        "{message}"
    );

    // The second connection from 127.0.0.1 exceeds the per-address limit:
    // the gateway saw the address through its TLS accept loop.
    let mut second = open_wss(&gw, &path("ca.pem")).await;
    let refused = next_text(&mut second).await;
    assert!(refused.starts_with("ERROR\n"), "{refused}");
    assert!(
        refused.contains("server.max_connections_per_ip (1)"),
        "{refused}"
    );

    ws.send(Message::text("DISCONNECT\nreceipt:bye\n\n\0"))
        .await
        .unwrap();
    assert!(next_text(&mut ws)
        .await
        .starts_with("RECEIPT\nreceipt-id:bye\n"));
    gw.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn half_or_bad_tls_settings_are_refused_at_start() {
    let missing = std::collections::HashMap::from([(
        "STOMPGATE__SERVER__TLS__CERT".to_owned(),
        "/nonexistent/cert.pem".to_owned(),
    )]);
    let error = stompgate::config::Config::load_from(None, Some(missing)).unwrap_err();
    assert!(error.to_string().contains("server.tls"), "{error}");
    let both = std::collections::HashMap::from([
        (
            "STOMPGATE__SERVER__TLS__CERT".to_owned(),
            "/nonexistent/cert.pem".to_owned(),
        ),
        (
            "STOMPGATE__SERVER__TLS__KEY".to_owned(),
            "/nonexistent/key.pem".to_owned(),
        ),
    ]);
    let error = stompgate::config::Config::load_from(None, Some(both)).unwrap_err();
    assert!(
        error.to_string().contains("/nonexistent/cert.pem"),
        "{error}"
    );
}
