//! `amqps://` against a real RabbitMQ TLS listener: a private broker node
//! started by the test on its own ports and data directory, with a CA, a
//! server certificate and a client certificate made by the test. The node
//! requires the client's certificate (`fail_if_no_peer_cert`), so the
//! gateway's `amqp.tls.ca_file`, `cert_file` and `key_file` are all
//! exercised; the node is stopped when the test ends, failed or not.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A private RabbitMQ node with only a TLS listener.
struct TlsBroker {
    child: Child,
    dir: PathBuf,
    port: u16,
}

/// A free port on loopback (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA, a server certificate for localhost and 127.0.0.1, and a client
/// certificate, all in `dir`.
fn make_certificates(dir: &Path) {
    let at = |name: &str| dir.join(name).to_string_lossy().into_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=stompgate test CA",
        "-keyout",
        &at("ca.key"),
        "-out",
        &at("ca.pem"),
    ]);
    // Extensions make version 3 certificates, which rustls requires.
    std::fs::write(
        dir.join("server.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subject) in [("server", "/CN=localhost"), ("client", "/CN=stompgate")] {
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &at(&format!("{name}.key")),
            "-out",
            &at(&format!("{name}.csr")),
        ]);
        let sign = vec![
            "x509".to_owned(),
            "-req".into(),
            "-days".into(),
            "2".into(),
            "-in".into(),
            at(&format!("{name}.csr")),
            "-CA".into(),
            at("ca.pem"),
            "-CAkey".into(),
            at("ca.key"),
            "-CAcreateserial".into(),
            "-out".into(),
            at(&format!("{name}.pem")),
            "-extfile".into(),
            at(&format!("{name}.cnf")),
        ];
        openssl(&sign.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

impl TlsBroker {
    fn start() -> TlsBroker {
        let dir = std::env::temp_dir().join(unique("stompgate-tls-broker"));
        std::fs::create_dir_all(&dir).unwrap();
        make_certificates(&dir);
        let port = free_port();
        let at = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let config = format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n",
            at("ca.pem"),
            at("server.pem"),
            at("server.key"),
        );
        std::fs::write(dir.join("rabbitmq.conf"), config).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let server = "/usr/lib/rabbitmq/bin/rabbitmq-server";
        assert!(
            Path::new(server).exists(),
            "{server} is missing: scripts/test installs rabbitmq-server"
        );
        let node = format!("{}@localhost", unique("stompgate-tls"));
        let child = Command::new(server)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &dir)
            .env("RABBITMQ_NODENAME", node)
            .env("RABBITMQ_CONFIG_FILE", at("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", "/dev/null")
            .env("RABBITMQ_MNESIA_BASE", at("mnesia"))
            .env("RABBITMQ_LOG_BASE", at("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", at("enabled_plugins"))
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a private RabbitMQ node");
        let broker = TlsBroker { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the private TLS broker did not listen on {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        broker
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.port)
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// With the private CA and a client certificate, sessions run over TLS;
/// without the certificate, or without the CA, the broker connection is
/// refused with a TLS reason that `/readyz` and the log show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_and_a_client_certificate() {
    require_rabbitmq().await;
    let broker = TlsBroker::start();
    let gw = Gateway::start_with(|c| {
        c.amqp.url = broker.url();
        c.amqp.tls.ca_file = broker.file("ca.pem");
        c.amqp.tls.cert_file = broker.file("client.pem");
        c.amqp.tls.key_file = broker.file("client.key");
    })
    .await;
    let (mut client, _) = Client::connect(&gw).await;
    let dest = format!("/topic/{}", unique("tls"));
    client.subscribe("s", &dest).await;
    let (receipt, message) = client.send_to_self(&dest, "over amqps").await;
    assert_eq!(receipt.get("routed"), Some("true"));
    assert_eq!(body_text(&message), "over amqps");
    wait_readyz(&gw, 200, WAIT).await;
    client.disconnect().await;
    gw.stop().await;

    // The broker asks for a client certificate the gateway lacks.
    let gw = Gateway::start_with(|c| {
        c.amqp.url = broker.url();
        c.amqp.tls.ca_file = broker.file("ca.pem");
    })
    .await;
    let body = wait_readyz_saying(&gw, 503, "CertificateRequired", WAIT).await;
    assert!(body.contains("localhost"), "{body}");
    gw.stop().await;

    // The system's CAs do not know the broker's.
    let gw = Gateway::start_with(|c| {
        c.amqp.url = broker.url();
        c.amqp.tls.cert_file = broker.file("client.pem");
        c.amqp.tls.key_file = broker.file("client.key");
    })
    .await;
    let body = wait_readyz_saying(&gw, 503, "TLS", WAIT).await;
    assert!(
        body.to_lowercase().contains("unknown"),
        "an unknown issuer: {body}"
    );
    gw.stop().await;
}

/// Half a client certificate, or a CA file that holds none, stops the
/// start with the key named.
#[test]
fn amqp_tls_settings_are_checked_at_start() {
    let dir = std::env::temp_dir().join(unique("stompgate-tls-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_string_lossy().into_owned();
    for (envs, says) in [
        (
            vec![("STOMPGATE__AMQP__TLS__CERT_FILE", empty.as_str())],
            "both",
        ),
        (
            vec![("STOMPGATE__AMQP__TLS__CA_FILE", empty.as_str())],
            "no certificate",
        ),
    ] {
        let mut child = stompgate_command(&envs, &[]).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{envs:?} was accepted: the gateway started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{envs:?} was accepted");
        assert!(
            stderr.contains("amqp.tls") && stderr.contains(says),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
