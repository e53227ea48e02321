//! The real binary: it logs the bound address (so port 0 works), serves
//! STOMP, refuses bad configuration naming the key, and on SIGTERM tells
//! its clients, confirms in-flight publishes and exits 0.

mod common;

use std::time::Duration;

use common::{
    body_text, output_lines, require_rabbitmq, stompgate_command, unique, Client, Closed, Node,
};
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
    let mut child = stompgate_command(&[("STOMPGATE__SERVER__LISTEN", "0.0.0.0:0")], &[])
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let rx = output_lines(stdout);
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

/// The start line names what a newcomer needs (the WebSocket URL, the
/// demo page, the broker without its password, the node), each session's
/// end is one line with its reason, duration and counts, and a log that
/// is not a terminal has no colour codes.
#[tokio::test]
async fn the_log_says_where_to_connect_and_how_each_session_ended() {
    require_rabbitmq().await;
    let node = Node::spawn(&[]);
    let gw = &node.gateway;
    let start = node.wait_log("listening on ws://", Duration::from_secs(5));
    let addr = gw.http_url("");
    for part in [
        format!("demo={addr}"),
        "broker=amqp://guest:***@127.0.0.1:5672/%2f".to_owned(),
        format!("node_id={}", gw.config.server.node_id),
    ] {
        assert!(start.contains(&part), "{part:?} not in {start:?}");
    }
    let key = unique("log");
    let (mut client, session) = Client::connect(gw).await;
    client.subscribe("s", &format!("/topic/{key}")).await;
    client.send_to_self(&format!("/topic/{key}"), "hello").await;
    client.disconnect().await;
    let end = node.wait_log("session closed", Duration::from_secs(5));
    for part in [
        session.as_str(),
        "reason=Disconnected",
        "duration_ms=",
        "messages_in=1",
        "messages_out=1",
        "subscriptions=1",
    ] {
        assert!(end.contains(part), "{part:?} not in {end:?}");
    }
    let coloured = node.log_lines("\u{1b}[");
    assert!(
        coloured.is_empty(),
        "colour codes in a piped log: {coloured:?}"
    );
}

/// At a terminal the log has colour, unless NO_COLOR is set
/// (no-color.org). `script` gives the gateway a terminal.
#[test]
fn no_color_turns_colour_off_at_a_terminal() {
    let binary = env!("CARGO_BIN_EXE_stompgate");
    let coloured = |no_color: bool| {
        let mut command = std::process::Command::new("script");
        command
            .args(["-qec", binary, "/dev/null"])
            .env("STOMPGATE__SERVER__LISTEN", "127.0.0.1:0")
            .env("STOMPGATE__PRESENCE__ENABLED", "false")
            .env_remove("NO_COLOR")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        if no_color {
            command.env("NO_COLOR", "1");
        }
        let mut child = command
            .spawn()
            .expect("run `script` (util-linux) to give the gateway a terminal");
        let stdout = child.stdout.take().unwrap();
        let rx = output_lines(stdout);
        let line = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("no 'listening on' line within 20 s");
            if line.contains("listening on") {
                break line;
            }
        };
        // The terminal goes with `script`, and the gateway with it (SIGHUP).
        let _ = child.kill();
        let _ = child.wait();
        line.contains('\u{1b}')
    };
    assert!(coloured(false), "no colour at a terminal");
    assert!(!coloured(true), "colour at a terminal despite NO_COLOR");
}

/// List settings from the environment: comma-separated, or the JSON array
/// many users try first; both give the same list.
#[test]
fn list_settings_take_commas_or_a_json_array() {
    let load = |name: &str, value: &str| {
        let env: std::collections::HashMap<String, String> =
            [(name.to_owned(), value.to_owned())].into();
        Config::load_from(None, Some(env))
    };
    let urls = "amqp://a:b@h1:5672/%2f,amqp://a:b@h2:5672/%2f";
    let json = r#"["amqp://a:b@h1:5672/%2f", "amqp://a:b@h2:5672/%2f"]"#;
    for value in [urls, json] {
        let config = load("STOMPGATE__AMQP__URLS", value).unwrap();
        assert_eq!(
            config.amqp.urls,
            ["amqp://a:b@h1:5672/%2f", "amqp://a:b@h2:5672/%2f"],
            "{value}"
        );
    }
    let config = load(
        "STOMPGATE__SERVER__ALLOWED_ORIGINS",
        r#"["https://a.example","https://b.example"]"#,
    )
    .unwrap();
    assert_eq!(
        config.server.allowed_origins,
        ["https://a.example", "https://b.example"]
    );
    let config = load("STOMPGATE__AMQP__ALLOWED_EXCHANGES", "[]").unwrap();
    assert!(
        config.amqp.allowed_exchanges.is_empty(),
        "{:?}",
        config.amqp.allowed_exchanges
    );
    // Half a JSON array is refused, naming the setting.
    let error = load("STOMPGATE__AMQP__URLS", r#"["amqp://h1""#).unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("amqp.urls") && text.contains("JSON array"),
        "{text}"
    );
}

/// scripts/run and scripts/test stop at once, saying what to install, on
/// a machine whose cargo is Debian's (too old) or missing.
#[test]
fn the_scripts_say_which_rust_they_need() {
    let dir = std::env::temp_dir().join(unique("cargo"));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("cargo");
    std::fs::write(&fake, "#!/bin/sh\necho 'cargo 1.63.0'\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for (path, says) in [
        (
            format!("{}:/usr/bin:/bin", dir.display()),
            "this cargo is 1.63.0",
        ),
        ("/usr/bin:/bin".to_owned(), "cargo is not installed"),
    ] {
        let output = std::process::Command::new("bash")
            .args(["-c", ". scripts/need-rust && need_rust"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PATH", &path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{path}: went on");
        assert!(stderr.contains(says), "{path}: {stderr}");
        assert!(stderr.contains("rustup"), "{stderr}");
        assert!(stderr.contains("1.88"), "{stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
