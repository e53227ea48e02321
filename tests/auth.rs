//! auth.mode = "users": who may connect, and per-user grants for SUBSCRIBE
//! and SEND, over real WebSockets against the real RabbitMQ.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::sync::OnceLock;

use common::{body_text, refusals, stompgate_command, unique, Client, Gateway};
use stompgate::auth::{hash_password, AuthMode, UserConfig};
use stompgate::config::Config;
use stompgate::stomp::frame::Frame;

/// Hashing is slow on purpose: hash the test passwords once.
fn hashes() -> &'static (String, String) {
    static HASHES: OnceLock<(String, String)> = OnceLock::new();
    HASHES.get_or_init(|| {
        (
            hash_password("editor-pass").unwrap(),
            hash_password("reader-pass").unwrap(),
        )
    })
}

/// Users for a test whose channels start with `root`.
async fn gateway(root: &str) -> Gateway {
    let (editor, reader) = hashes().clone();
    let root = root.to_owned();
    Gateway::start_with(move |c| {
        c.auth.mode = AuthMode::Users;
        c.auth.users = vec![
            UserConfig {
                name: "editor".into(),
                password_hash: editor,
                subscribe: vec![
                    format!("{root}.no01"),
                    format!("{root}.no02"),
                    "amq.direct/orders.#".into(),
                ],
                publish: vec![format!("{root}.no01")],
            },
            UserConfig {
                name: "reader".into(),
                password_hash: reader,
                subscribe: vec![format!("{root}.news.*")],
                publish: vec![],
            },
        ];
    })
    .await
}

fn connect_frame(login: Option<&str>, passcode: Option<&str>) -> Frame {
    let mut frame = Frame::new("CONNECT").header("accept-version", "1.2");
    if let Some(login) = login {
        frame = frame.header("login", login);
    }
    if let Some(passcode) = passcode {
        frame = frame.header("passcode", passcode);
    }
    frame
}

async fn login(gw: &Gateway, user: &str, passcode: &str) -> Client {
    let mut client = Client::open(gw).await;
    client
        .handshake(connect_frame(Some(user), Some(passcode)))
        .await;
    client
}

#[tokio::test]
async fn wrong_unknown_or_missing_credentials_are_refused_alike() {
    let root = unique("auth");
    let gw = gateway(&root).await;
    let mut bodies = Vec::new();
    for (login, passcode) in [
        (Some("editor"), Some("wrong")),
        (Some("nobody"), Some("editor-pass")),
        (None, None),
    ] {
        let mut client = Client::open(&gw).await;
        client.send_frame(&connect_frame(login, passcode)).await;
        let error = client.expect_error().await;
        assert_eq!(error.get("message"), Some("access refused"));
        bodies.push(body_text(&error).to_owned());
    }
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "refusals must not differ: {bodies:?}"
    );
    assert_eq!(refusals(&gw, "auth").await, 3.0);
    // The right passcode gets in.
    login(&gw, "editor", "editor-pass").await.disconnect().await;
    gw.stop().await;
}

/// One user, `editor`, with no grants, and `failed_login_limit`.
async fn editor_gateway(failed_login_limit: u32) -> Gateway {
    let (editor, _) = hashes().clone();
    Gateway::start_with(move |c| {
        c.auth.mode = AuthMode::Users;
        c.auth.users = vec![UserConfig {
            name: "editor".into(),
            password_hash: editor,
            subscribe: vec![],
            publish: vec![],
        }];
        c.auth.failed_login_limit = failed_login_limit;
    })
    .await
}

/// Sends CONNECT with `passcode` for `user`; the ERROR's message.
async fn refusal(gw: &Gateway, user: &str, passcode: &str) -> String {
    let mut client = Client::open(gw).await;
    client
        .send_frame(&connect_frame(Some(user), Some(passcode)))
        .await;
    let error = client.expect_error().await;
    error.get("message").unwrap_or_default().to_owned()
}

/// Failed logins cannot exhaust the node: 48 wrong passcodes at once run
/// at most a core's worth of argon2 checks at a time, each in a reused
/// memory block (before: 48 × 19 MiB at once), and an address that keeps
/// failing is turned away without a check, the right passcode included,
/// until auth.failed_login_window has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_bounded_and_throttled() {
    let gw = editor_gateway(1000).await;
    let before = common::resident_kib();
    let mut attempts = Vec::new();
    for i in 0..48 {
        let url = gw.ws_url();
        attempts.push(tokio::spawn(async move {
            let mut client = Client::open_url(&url, &[]).await;
            client
                .send_frame(&connect_frame(Some(&format!("u{i}")), Some("wrong")))
                .await;
            client.expect_error().await
        }));
    }
    let mut busy = 0;
    for attempt in attempts {
        let error = attempt.await.unwrap();
        match error.get("message") {
            Some("access refused") => {}
            Some("try again later") => busy += 1,
            other => panic!("{other:?}"),
        }
    }
    let grown_mib = common::resident_kib().saturating_sub(before) / 1024;
    println!("48 failed logins at once: {busy} told to try later, RSS +{grown_mib} MiB");
    assert!(grown_mib < 200, "RSS grew {grown_mib} MiB");
    gw.stop().await;

    let gw = editor_gateway(3).await;
    for i in 0..3 {
        assert_eq!(
            refusal(&gw, &format!("guess{i}"), "wrong").await,
            "access refused"
        );
    }
    assert_eq!(
        refusal(&gw, "editor", "editor-pass").await,
        "try again later"
    );
    assert_eq!(refusals(&gw, "auth.failed_login_limit").await, 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn grants_separate_subscribe_from_send() {
    let root = unique("grant");
    let gw = gateway(&root).await;
    let no01 = format!("/topic/{root}.no01");
    let no02 = format!("/topic/{root}.no02");

    let mut editor = login(&gw, "editor", "editor-pass").await;
    editor.subscribe("1", &no01).await;
    let mut watcher = login(&gw, "editor", "editor-pass").await;
    watcher.subscribe("2", &no02).await;
    let (receipt, message) = editor.send_to_self(&no01, "granted").await;
    assert_eq!(receipt.get("routed"), Some("true"));
    assert_eq!(body_text(&message), "granted");

    // May read no02 but not write it: ERROR, close, nothing published.
    editor.send(&no02, "not granted").await;
    let error = editor.expect_error().await;
    assert_eq!(error.get("message"), Some("access refused"));
    assert!(body_text(&error).contains("not granted"));
    let (connection, channel) = common::amqp_channel().await;
    channel
        .basic_publish(
            "amq.topic".into(),
            format!("{root}.no02").as_str().into(),
            Default::default(),
            b"marker",
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(body_text(&watcher.recv_message().await), "marker");
    connection.close(200, "done".into()).await.unwrap();
    watcher.disconnect().await;

    // Grants on another exchange.
    let mut editor = login(&gw, "editor", "editor-pass").await;
    editor
        .subscribe("o", "/exchange/amq.direct/orders.eu")
        .await;
    editor.disconnect().await;
    assert_eq!(refusals(&gw, "auth.users").await, 1.0);
    gw.stop().await;
}

/// A wildcard SUBSCRIBE must be covered by a grant: news.* allows
/// news.sport and news.* but not news.# or #.
#[tokio::test]
async fn wildcard_subscriptions_must_be_covered() {
    let root = unique("wild");
    let gw = gateway(&root).await;
    let mut reader = login(&gw, "reader", "reader-pass").await;
    reader
        .subscribe("a", &format!("/topic/{root}.news.sport"))
        .await;
    reader.subscribe("b", &format!("/sub/{root}.news.*")).await;
    reader.disconnect().await;
    for wanted in [
        format!("{root}.news.#"),
        "#".to_owned(),
        format!("{root}.*.sport"),
    ] {
        let mut reader = login(&gw, "reader", "reader-pass").await;
        reader
            .send_frame(
                &Frame::new("SUBSCRIBE")
                    .header("id", "x")
                    .header("destination", format!("/topic/{wanted}"))
                    .header("receipt", "r"),
            )
            .await;
        let error = reader.expect_error().await;
        assert_eq!(error.get("message"), Some("access refused"), "{wanted}");
        assert_eq!(error.get("receipt-id"), Some("r"));
    }
    // Readers may not publish at all.
    let mut reader = login(&gw, "reader", "reader-pass").await;
    reader.send(&format!("/topic/{root}.news.sport"), "x").await;
    assert_eq!(
        reader.expect_error().await.get("message"),
        Some("access refused")
    );
    gw.stop().await;
}

#[test]
fn hash_password_subcommand_and_bad_hashes() {
    let mut child = stompgate_command(&[], &["hash-password"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let hash = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");

    // A config with that hash is accepted; a mangled one is refused at start.
    let dir = std::env::temp_dir().join(unique("authcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("auth.toml");
    let toml = |hash: &str| {
        format!(
            "[auth]\nmode = \"users\"\n[[auth.users]]\nname = \"a\"\npassword_hash = \"{hash}\"\nsubscribe = [\"#\"]\n"
        )
    };
    std::fs::write(&file, toml(&hash)).unwrap();
    assert!(Config::load_from(Some(&file), Some(Default::default())).is_ok());
    std::fs::write(&file, toml("not-a-hash")).unwrap();
    let error = Config::load_from(Some(&file), Some(Default::default())).unwrap_err();
    assert!(error.to_string().contains("auth"), "{error}");
    std::fs::remove_dir_all(dir).unwrap();
}

mod jwt {
    use super::*;
    use common::openssl;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use std::time::{SystemTime, UNIX_EPOCH};

    const SECRET: &str = "a-test-secret-of-decent-length-0123456789";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(exp: u64, subscribe: &[String], publish: &[String]) -> serde_json::Value {
        serde_json::json!({
            "sub": "jwt-user",
            "exp": exp,
            "stomp": {"subscribe": subscribe, "publish": publish},
        })
    }

    fn hs256(claims: &serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    async fn hs256_gateway() -> Gateway {
        Gateway::start_with(|c| {
            c.auth.mode = AuthMode::Jwt;
            c.auth.jwt.algorithm = "HS256".into();
            c.auth.jwt.secret = SECRET.into();
        })
        .await
    }

    async fn refused(mut client: Client, passcode: Option<&str>) {
        client.send_frame(&connect_frame(None, passcode)).await;
        assert_eq!(
            client.expect_error().await.get("message"),
            Some("access refused")
        );
    }

    #[tokio::test]
    async fn token_in_passcode_header_or_query() {
        let gw = hs256_gateway().await;
        let root = unique("jwt");
        let token = hs256(&claims(
            now() + 600,
            &[format!("{root}.#")],
            &[format!("{root}.no01")],
        ));
        // In the passcode, as RabbitMQ's OAuth 2 plugin takes it.
        let mut client = Client::open(&gw).await;
        client.handshake(connect_frame(None, Some(&token))).await;
        client.subscribe("s", &format!("/topic/{root}.no01")).await;
        let (_, message) = client
            .send_to_self(&format!("/topic/{root}.no01"), "hi")
            .await;
        assert_eq!(body_text(&message), "hi");
        client
            .send(&format!("/topic/{root}.no02"), "not granted")
            .await;
        assert_eq!(
            client.expect_error().await.get("message"),
            Some("access refused")
        );
        // In the upgrade's Authorization header, and its access_token parameter.
        let bearer = format!("Bearer {token}");
        let mut by_header = Client::open_url(&gw.ws_url(), &[("authorization", &bearer)]).await;
        by_header.handshake(connect_frame(None, None)).await;
        by_header.disconnect().await;
        let url = format!("{}?access_token={token}", gw.ws_url());
        let mut by_query = Client::open_url(&url, &[]).await;
        by_query.handshake(connect_frame(None, None)).await;
        by_query.disconnect().await;
        gw.stop().await;
    }

    #[tokio::test]
    async fn bad_tokens_are_refused() {
        let gw = hs256_gateway().await;
        let expired = hs256(&claims(now() - 10, &[], &[]));
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims(now() + 600, &["#".into()], &["#".into()]),
            &EncodingKey::from_secret(b"not the secret"),
        )
        .unwrap();
        for passcode in [
            Some(expired.as_str()),
            Some(forged.as_str()),
            Some("garbage"),
            None,
        ] {
            refused(Client::open(&gw).await, passcode).await;
        }
        gw.stop().await;
    }

    /// A configured issuer and audience are required, not only checked
    /// when present; nbf is honoured within auth.jwt.nbf_leeway; an exp
    /// no issuer means (u64::MAX) is refused without harm to the node.
    #[tokio::test]
    async fn claims_that_are_missing_early_or_absurd_are_refused() {
        let gw = Gateway::start_with(|c| {
            c.auth.mode = AuthMode::Jwt;
            c.auth.jwt.algorithm = "HS256".into();
            c.auth.jwt.secret = SECRET.into();
            c.auth.jwt.issuer = "https://issuer.example".into();
            c.auth.jwt.audience = "stompgate".into();
        })
        .await;
        let with = |extra: serde_json::Value| {
            let mut claims = claims(now() + 600, &["#".into()], &[]);
            for (k, v) in extra.as_object().unwrap() {
                claims[k] = v.clone();
            }
            hs256(&claims)
        };
        let good = serde_json::json!({"iss": "https://issuer.example", "aud": "stompgate"});
        let mut client = Client::open(&gw).await;
        client
            .handshake(connect_frame(None, Some(&with(good.clone()))))
            .await;
        client.disconnect().await;
        let refused_tokens = [
            with(serde_json::json!({"aud": "stompgate"})),
            with(serde_json::json!({"iss": "https://issuer.example"})),
            with(serde_json::json!({
                "iss": "https://issuer.example", "aud": "stompgate", "nbf": now() + 3600,
            })),
            with(serde_json::json!({
                "iss": "https://issuer.example", "aud": "stompgate", "exp": u64::MAX,
            })),
        ];
        for token in &refused_tokens {
            refused(Client::open(&gw).await, Some(token)).await;
        }
        // nbf a few seconds ahead is within the default leeway (30 s).
        let skewed = with(serde_json::json!({
            "iss": "https://issuer.example", "aud": "stompgate", "nbf": now() + 5,
        }));
        let mut client = Client::open(&gw).await;
        client.handshake(connect_frame(None, Some(&skewed))).await;
        client.disconnect().await;
        // Nothing was left behind by the refusals: no session is stuck.
        common::settle(&gw, "stompgate_connections_open", 0.0).await;
        gw.stop().await;
    }

    /// exp holds for the whole connection, not only at CONNECT.
    #[tokio::test]
    async fn expiry_ends_the_connection() {
        let gw = hs256_gateway().await;
        let token = hs256(&claims(now() + 2, &["#".into()], &[]));
        let mut client = Client::open(&gw).await;
        client.handshake(connect_frame(None, Some(&token))).await;
        client
            .subscribe("s", &format!("/topic/{}", unique("exp")))
            .await;
        let error = client.expect_error().await;
        assert_eq!(error.get("message"), Some("token expired"));
        gw.stop().await;
    }

    /// RS256 and ES256 with key pairs made by openssl for the test.
    #[tokio::test]
    async fn public_key_algorithms() {
        let dir = std::env::temp_dir().join(unique("keys"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &path("rsa.pem"),
        ]);
        openssl(&[
            "pkey",
            "-in",
            &path("rsa.pem"),
            "-pubout",
            "-out",
            &path("rsa.pub"),
        ]);
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &path("ec.pem"),
        ]);
        openssl(&[
            "pkey",
            "-in",
            &path("ec.pem"),
            "-pubout",
            "-out",
            &path("ec.pub"),
        ]);
        for (algorithm, private, public) in [
            ("RS256", "rsa.pem", "rsa.pub"),
            ("ES256", "ec.pem", "ec.pub"),
        ] {
            let pem = std::fs::read(path(private)).unwrap();
            let (alg, key) = match algorithm {
                "RS256" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem).unwrap()),
                _ => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem).unwrap()),
            };
            let token = encode(
                &Header::new(alg),
                &claims(now() + 600, &["#".into()], &[]),
                &key,
            )
            .unwrap();
            let public_key = path(public);
            let gw = Gateway::start_with(move |c| {
                c.auth.mode = AuthMode::Jwt;
                c.auth.jwt.algorithm = algorithm.into();
                c.auth.jwt.public_key_file = public_key;
            })
            .await;
            let mut client = Client::open(&gw).await;
            client.handshake(connect_frame(None, Some(&token))).await;
            client
                .subscribe("s", &format!("/topic/{}", unique("pk")))
                .await;
            client.disconnect().await;
            // An HS256 token signed with the public key's bytes is refused.
            let confused = encode(
                &Header::new(Algorithm::HS256),
                &claims(now() + 600, &["#".into()], &[]),
                &EncodingKey::from_secret(&std::fs::read(path(public)).unwrap()),
            )
            .unwrap();
            refused(Client::open(&gw).await, Some(&confused)).await;
            gw.stop().await;
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A token's `stomp.publish` patterns on the direct exchange say whom
    /// its user may write to, as `auth.users` grants do; the token's `sub`
    /// is the user its inbox and its messages' sender are named by.
    #[tokio::test]
    async fn token_grants_say_whom_a_user_may_write_to() {
        let gw = hs256_gateway().await;
        let (ann, bob, eve) = (unique("ann"), unique("bob"), unique("eve"));
        let token = |sub: &str, publish: &[String]| {
            hs256(&serde_json::json!({
                "sub": sub,
                "exp": now() + 600,
                "stomp": {"subscribe": [], "publish": publish},
            }))
        };
        let mut reader = Client::open(&gw).await;
        reader
            .handshake(connect_frame(None, Some(&token(&ann, &[]))))
            .await;
        reader.subscribe("in", "/user/queue/inbox").await;
        let mut writer = Client::open(&gw).await;
        let granted = [format!("stompgate.direct/user.{ann}.*")];
        writer
            .handshake(connect_frame(None, Some(&token(&bob, &granted))))
            .await;
        writer
            .send(&format!("/user/{ann}/queue/inbox"), "from bob")
            .await;
        let message = reader.recv_message().await;
        assert_eq!(body_text(&message), "from bob");
        assert_eq!(message.get("stompgate-sender-user"), Some(bob.as_str()));
        writer
            .send(&format!("/user/{eve}/queue/inbox"), "not granted")
            .await;
        assert_eq!(
            writer.expect_error().await.get("message"),
            Some("access refused")
        );
        reader.disconnect().await;
        gw.stop().await;
    }
}
