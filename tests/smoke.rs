//! The real binary: it logs the bound address (so port 0 works), serves
//! STOMP, refuses bad configuration naming the key, and on SIGTERM tells
//! its clients, confirms in-flight publishes and exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{body_text, require_rabbitmq, unique, Client, Closed, Gateway, AMQP_URL};
use stompgate::config::Config;
use stompgate::stomp::frame::Frame;

const BINARY: &str = env!("CARGO_BIN_EXE_stompgate");

fn stompgate(envs: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Reads the log until the "listening" line; returns the bound address.
fn wait_listening(child: &mut Child) -> SocketAddr {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent {
                if let Some(rest) = line.split("listening on ws://").nth(1) {
                    let addr = rest.split("/ws").next().unwrap().to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no 'listening on ws://…' log line within 20 s");
    addr.parse().expect("bound address in the log line")
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("stompgate did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A handle on the spawned binary for the in-process test client.
fn as_gateway(addr: SocketAddr, node_id: &str) -> Gateway {
    let mut config = Config::defaults().unwrap();
    config.server.node_id = node_id.to_owned();
    Gateway::external(addr, Arc::new(config))
}

#[tokio::test]
async fn binary_serves_and_shuts_down_gracefully_on_sigterm() {
    require_rabbitmq().await;
    let node = unique("smoke");
    let mut child = stompgate(
        &[
            ("STOMPGATE__SERVER__LISTEN", "127.0.0.1:0"),
            ("STOMPGATE__SERVER__NODE_ID", &node),
            ("STOMPGATE__AMQP__URL", AMQP_URL),
        ],
        &[],
    )
    .spawn()
    .expect("run the stompgate binary");
    let addr = wait_listening(&mut child);
    let gw = as_gateway(addr, &node);

    let key = unique("smoke");
    let (mut reader, _) = Client::connect(&gw).await;
    reader.subscribe("s", &format!("/topic/{key}")).await;
    let (mut writer, _) = Client::connect(&gw).await;
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
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

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
    let status = wait_exit(&mut child, Duration::from_secs(20));
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
        let output = stompgate(envs, &[]).output().unwrap();
        assert!(!output.status.success(), "{envs:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(key),
            "error for {envs:?} does not name {key}: {stderr}"
        );
    }
    let output = stompgate(&[], &["--config", "/nonexistent/stompgate.toml"])
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
