//! The real binary: it logs the bound address (so port 0 works), serves
//! STOMP, refuses bad configuration naming the key, and on SIGTERM tells
//! its clients, confirms in-flight publishes and exits 0.

mod common;

use std::time::Duration;

use common::{body_text, require_rabbitmq, stompgate_command, unique, Client, Closed, Node};
use stompgate::config::Config;
use stompgate::stomp::frame::Frame;

#[tokio::test]
async fn binary_serves_and_shuts_down_gracefully_on_sigterm() {
    require_rabbitmq().await;
    let mut node = Node::spawn(&[]);
    let gw = &node.gateway;

    let key = unique("smoke");
    let (mut reader, _) = Client::connect(gw).await;
    reader.subscribe("s", &format!("/topic/{key}")).await;
    let (mut writer, _) = Client::connect(gw).await;
    let receipt = writer
        .send_confirmed(&format!("/topic/{key}"), "before")
        .await;
    assert_eq!(receipt.get("routed"), Some("true"));
    assert_eq!(body_text(&reader.recv_message().await), "before");

    // A publish in flight when SIGTERM lands still gets its receipt.
    writer
        .send_frame(
            &Frame::new("SEND")
                .header("destination", format!("/topic/{key}"))
                .header("receipt", "inflight")
                .body(&b"during"[..]),
        )
        .await;
    writer.expect_receipt("inflight").await;
    node.signal("-TERM");

    for client in [&mut reader, &mut writer] {
        let frame = loop {
            let frame = client.recv().await;
            if frame.command != "MESSAGE" {
                break frame;
            }
        };
        assert_eq!(frame.command, "ERROR");
        assert_eq!(frame.get("message"), Some("server shutting down"));
        match client.expect_closed().await {
            Closed::Code(code) => assert_eq!(code, 1001),
            Closed::Dropped => panic!("expected close 1001, the socket just dropped"),
        }
    }
    let status = node.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn bad_configuration_is_refused_naming_the_key() {
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("STOMPGATE__AMQP__PREFETCH", "lots")], "prefetch"),
        (&[("STOMPGATE__SERVER__LISTN", "0.0.0.0:1")], "listn"),
        (&[("STOMPGATE__AMQP__URL", "http://nope")], "amqp.url"),
        (&[("STOMPGATE__SERVER__LISTEN", "not-an-address")], "listen"),
        (
            &[("STOMPGATE__STOMP__CONNECT_TIMEOUT", "soon")],
            "connect_timeout",
        ),
    ];
    for (envs, key) in cases {
        let output = stompgate_command(envs, &[]).output().unwrap();
        assert!(!output.status.success(), "{envs:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(key),
            "error for {envs:?} does not name {key}: {stderr}"
        );
    }
    let output = stompgate_command(&[], &["--config", "/nonexistent/stompgate.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("stompgate.toml"));
}

#[test]
fn config_file_then_environment() {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gate.toml");
    std::fs::write(
        &file,
        "[stomp]\nmax_subscriptions = 7\nmax_headers = 9\n[amqp]\nexchange = \"news\"\n",
    )
    .unwrap();
    let env: std::collections::HashMap<String, String> =
        [("STOMPGATE__STOMP__MAX_HEADERS".to_owned(), "11".to_owned())].into();
    let config = Config::load_from(Some(&file), Some(env)).unwrap();
    assert_eq!(config.stomp.max_subscriptions, 7, "file overrides default");
    assert_eq!(config.stomp.max_headers, 11, "environment overrides file");
    assert_eq!(config.amqp.exchange, "news");
    assert_eq!(
        config.server.listen.to_string(),
        "0.0.0.0:8080",
        "default kept"
    );
    assert!(!config.server.node_id.is_empty(), "node id derived");
    std::fs::remove_dir_all(dir).unwrap();
}

/// auth.mode "none" on a non-loopback address gets a warning at start.
#[test]
fn open_access_beyond_loopback_is_warned_about() {
    use std::io::{BufRead, BufReader};
    let mut child = stompgate_command(&[("STOMPGATE__SERVER__LISTEN", "0.0.0.0:0")], &[])
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let warned = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("auth.mode is \"none\"") => break true,
            Ok(line) if line.contains("listening on") => break false,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "no warning about auth.mode none on 0.0.0.0");
}
