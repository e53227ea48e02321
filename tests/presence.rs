//! Presence (issue 16, the seed's `new` and `close`), across nodes and
//! through RabbitMQ only: a SUBSCRIBE to `/presence/<key>` gets a snapshot
//! of the sessions subscribed to `<key>` on every node, then a MESSAGE for
//! each join and leave, including the members of a node that was killed.
//! Nodes are gateways in this process and processes of their own, on the
//! local RabbitMQ.

mod common;

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{scrape, unique, Client, Gateway, Node, WAIT};
use stompgate::auth::{hash_password, AuthMode, UserConfig};
use stompgate::stomp::frame::Frame;

/// A session subscribed to `/topic/<key>`, with its session id.
async fn reader(gw: &Gateway, key: &str) -> (Client, String) {
    let (mut client, session) = Client::connect(gw).await;
    client.subscribe("paper", &format!("/topic/{key}")).await;
    (client, session)
}

/// The next MESSAGE, which must be presence's `kind`; its JSON body.
async fn expect(watcher: &mut Client, kind: &str) -> (Frame, serde_json::Value) {
    let frame = watcher.recv_message().await;
    assert_eq!(
        frame.get("stompgate-presence"),
        Some(kind),
        "expected a presence {kind}, got {frame:?}"
    );
    assert_eq!(frame.get("content-type"), Some("application/json"));
    let body = serde_json::from_slice(&frame.body).expect("a JSON body");
    (frame, body)
}

/// The sessions a snapshot lists.
fn members(snapshot: &serde_json::Value) -> BTreeSet<String> {
    snapshot["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["session"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts a join or leave of `session` (with `reason` for a leave).
async fn expect_event(watcher: &mut Client, kind: &str, session: &str, reason: Option<&str>) {
    let (frame, body) = expect(watcher, kind).await;
    assert_eq!(frame.get("stompgate-presence-session"), Some(session));
    assert_eq!(body["presence"], kind);
    assert_eq!(body["session"], session);
    assert_eq!(frame.get("stompgate-presence-reason"), reason);
    assert_eq!(body["reason"].as_str(), reason);
}

/// Waits until `watching` has heard from each of `nodes`. A snapshot
/// waits only for the nodes its gateway knows: a node that started a
/// moment ago, before its first beat reached the others, is not in it
/// (its members follow as joins). So a test that checks a snapshot
/// across nodes first watches a probe key with one reader on each node,
/// until every reader shows, in the snapshot or as a join.
async fn known_to(watching: &Gateway, nodes: &[&Gateway]) {
    let key = unique("probe");
    let mut probes = Vec::new();
    for node in nodes {
        probes.push(reader(node, &key).await);
    }
    let want: BTreeSet<String> = probes.iter().map(|(_, s)| s.clone()).collect();
    let (mut watcher, _) = Client::connect(watching).await;
    watcher
        .subscribe("probe", &format!("/presence/{key}"))
        .await;
    let (_, snapshot) = expect(&mut watcher, "snapshot").await;
    let mut seen = members(&snapshot);
    while seen != want {
        let (_, join) = expect(&mut watcher, "join").await;
        seen.insert(join["session"].as_str().expect("a session").to_owned());
    }
    watcher.disconnect().await;
    for (probe, _) in probes {
        probe.disconnect().await;
    }
}

#[tokio::test]
async fn a_watcher_sees_who_reads_a_key_on_every_node() {
    common::require_rabbitmq().await;
    // Three nodes: one in this process, two processes of their own.
    let gw1 = Gateway::start().await;
    let (node2, node3) = (Node::spawn(&[]), Node::spawn(&[]));
    let (gw2, gw3) = (&node2.gateway, &node3.gateway);
    known_to(&gw1, &[gw2, gw3]).await;
    let key = unique("paper");
    let (mut a, a_session) = reader(gw2, &key).await;
    let (mut b, b_session) = reader(gw3, &key).await;
    // A second subscription to the key is still one member.
    b.subscribe("again", &format!("/sub/{key}")).await;
    // Subscribed to another key, or to a pattern: not a member.
    let (other, _) = reader(gw2, &unique("other")).await;
    let (mut pattern, _) = Client::connect(gw3).await;
    pattern.subscribe("p", &format!("/topic/{key}.*")).await;

    let (mut watcher, _) = Client::connect(&gw1).await;
    watcher.subscribe("who", &format!("/presence/{key}")).await;
    let (frame, snapshot) = expect(&mut watcher, "snapshot").await;
    let want: BTreeSet<String> = [a_session.clone(), b_session.clone()].into();
    assert_eq!(members(&snapshot), want, "{snapshot}");
    assert_eq!(
        frame.get("destination"),
        Some(format!("/presence/{key}").as_str())
    );
    assert_eq!(frame.get("subscription"), Some("who"));
    assert_eq!(frame.get("stompgate-presence-count"), Some("2"));
    assert_eq!(frame.get("stompgate-presence-truncated"), Some("false"));
    assert_eq!(snapshot["key"], key.as_str());
    // auth.mode = "none": a login is only a claim, and names nobody.
    assert!(snapshot["members"][0]["user"].is_null());

    // A join on the watcher's own node, leaves on the others.
    let (c, c_session) = reader(&gw1, &key).await;
    expect_event(&mut watcher, "join", &c_session, None).await;
    b.unsubscribe("again").await;
    a.unsubscribe("paper").await;
    expect_event(&mut watcher, "leave", &a_session, Some("unsubscribe")).await;
    b.disconnect().await;
    expect_event(&mut watcher, "leave", &b_session, Some("disconnect")).await;

    // A second watcher, on another node, gets that node's table at once.
    let (mut second, _) = Client::connect(gw3).await;
    second.subscribe("who", &format!("/presence/{key}")).await;
    let (_, snapshot) = expect(&mut second, "snapshot").await;
    assert_eq!(members(&snapshot), [c_session.clone()].into(), "{snapshot}");
    // A connection that just drops leaves too, for both.
    drop(c);
    for w in [&mut watcher, &mut second] {
        expect_event(w, "leave", &c_session, Some("disconnect")).await;
    }
    // UNSUBSCRIBE from /presence/ ends the events: a marker session
    // joining after it is the next thing the first watcher sees.
    second.unsubscribe("who").await;
    let (mut d, d_session) = reader(&gw1, &key).await;
    expect_event(&mut watcher, "join", &d_session, None).await;
    d.unsubscribe("paper").await;
    expect_event(&mut watcher, "leave", &d_session, Some("unsubscribe")).await;
    for client in [a, second, d, other, pattern, watcher] {
        client.disconnect().await;
    }
    gw1.stop().await;
}

#[tokio::test]
async fn a_killed_nodes_members_leave_within_node_timeout_and_a_beat() {
    common::require_rabbitmq().await;
    let gw1 = Gateway::start().await;
    let mut doomed = Node::spawn(&[]);
    known_to(&gw1, &[&doomed.gateway]).await;
    let key = unique("paper");
    let (_a, a_session) = reader(&doomed.gateway, &key).await;
    let (mut watcher, _) = Client::connect(&gw1).await;
    watcher.subscribe("who", &format!("/presence/{key}")).await;
    let (_, snapshot) = expect(&mut watcher, "snapshot").await;
    assert_eq!(members(&snapshot), [a_session.clone()].into(), "{snapshot}");

    // SIGKILL: nothing is said; the node's beats stop.
    doomed.signal("-KILL");
    let killed = Instant::now();
    doomed.wait_exit(WAIT);
    let presence = &gw1.config.presence;
    let bound = presence.node_timeout + presence.beat_interval;
    let frame = watcher
        .next(bound + WAIT)
        .await
        .expect("the watcher's connection stays open");
    let took = killed.elapsed();
    assert_eq!(frame.get("stompgate-presence"), Some("leave"), "{frame:?}");
    assert_eq!(
        frame.get("stompgate-presence-session"),
        Some(a_session.as_str())
    );
    assert_eq!(frame.get("stompgate-presence-reason"), Some("node-lost"));
    // The stated bound, with a second for a busy machine to schedule.
    assert!(
        took <= bound + Duration::from_secs(1),
        "the killed node's member left after {took:?}, over the bound of {bound:?}"
    );
    watcher.disconnect().await;
    gw1.stop().await;
}

/// A node that did not exist when the snapshot was taken (so it was not
/// waited for): its members come as joins, once each, however its first
/// beat and its reader's SUBSCRIBE cross.
#[tokio::test]
async fn a_node_started_after_the_snapshot_tells_its_members_as_joins() {
    common::require_rabbitmq().await;
    let gw1 = Gateway::start().await;
    let key = unique("paper");
    let (mut watcher, _) = Client::connect(&gw1).await;
    watcher.subscribe("who", &format!("/presence/{key}")).await;
    let (_, snapshot) = expect(&mut watcher, "snapshot").await;
    assert!(members(&snapshot).is_empty(), "{snapshot}");
    // Subscribed at once, while its agent may still be opening its queue.
    let late = Node::spawn(&[]);
    let (_a, a_session) = reader(&late.gateway, &key).await;
    expect_event(&mut watcher, "join", &a_session, None).await;
    // Told once: the next event is a marker's, not the same join again.
    let (_m, m_session) = reader(&gw1, &key).await;
    expect_event(&mut watcher, "join", &m_session, None).await;
    watcher.disconnect().await;
    drop(late);
    gw1.stop().await;
}

#[tokio::test]
async fn a_stopped_node_says_bye_and_its_members_leave_at_once() {
    common::require_rabbitmq().await;
    let gw1 = Gateway::start().await;
    let gw2 = Gateway::start().await;
    let key = unique("paper");
    let (mut watcher, _) = Client::connect(&gw1).await;
    watcher.subscribe("who", &format!("/presence/{key}")).await;
    expect(&mut watcher, "snapshot").await;
    let (_a, a_session) = reader(&gw2, &key).await;
    expect_event(&mut watcher, "join", &a_session, None).await;
    // A graceful stop: the session is told, and leaves as it closes.
    gw2.stop().await;
    expect_event(&mut watcher, "leave", &a_session, Some("disconnect")).await;
    watcher.disconnect().await;
    gw1.stop().await;
}

#[tokio::test]
async fn a_snapshot_past_max_members_says_it_is_truncated() {
    common::require_rabbitmq().await;
    let gw = Gateway::start_with(|c| c.presence.max_members = 2).await;
    let key = unique("paper");
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(reader(&gw, &key).await);
    }
    let (mut watcher, _) = Client::connect(&gw).await;
    watcher.subscribe("who", &format!("/presence/{key}")).await;
    let (frame, snapshot) = expect(&mut watcher, "snapshot").await;
    assert_eq!(frame.get("stompgate-presence-truncated"), Some("true"));
    assert_eq!(frame.get("stompgate-presence-count"), Some("2"));
    assert_eq!(snapshot["truncated"], true);
    let listed = members(&snapshot);
    assert_eq!(listed.len(), 2);
    // A listed member leaves: the watcher hears it. An unlisted one
    // leaves: nothing to tell (it was never shown).
    let (unlisted, shown): (Vec<_>, Vec<_>) =
        readers.into_iter().partition(|(_, s)| !listed.contains(s));
    for (client, _) in unlisted {
        client.disconnect().await;
    }
    for (client, session) in shown {
        client.disconnect().await;
        expect_event(&mut watcher, "leave", &session, Some("disconnect")).await;
    }
    watcher.disconnect().await;
    gw.stop().await;
}

fn users(hash: &str, ann: &str, key: &str) -> Vec<UserConfig> {
    vec![UserConfig {
        name: ann.to_owned(),
        password_hash: hash.to_owned(),
        subscribe: vec![key.to_owned()],
        publish: vec![],
    }]
}

#[tokio::test]
async fn watching_a_key_needs_its_subscribe_grant_and_shows_the_user() {
    common::require_rabbitmq().await;
    static HASH: OnceLock<String> = OnceLock::new();
    let hash = HASH.get_or_init(|| hash_password("pass").unwrap()).clone();
    let (ann, key) = (unique("ann"), unique("paper"));
    let grants = users(&hash, &ann, &key);
    let gw = Gateway::start_with(|c| {
        c.auth.mode = AuthMode::Users;
        c.auth.users = grants;
    })
    .await;
    let login = || {
        Frame::new("CONNECT")
            .header("accept-version", "1.2")
            .header("login", ann.as_str())
            .header("passcode", "pass")
    };
    let mut watcher = Client::open(&gw).await;
    watcher.handshake(login()).await;
    watcher.subscribe("who", &format!("/presence/{key}")).await;
    expect(&mut watcher, "snapshot").await;
    let mut member = Client::open(&gw).await;
    let member_session = member.handshake(login()).await;
    member.subscribe("paper", &format!("/topic/{key}")).await;
    let (frame, body) = expect(&mut watcher, "join").await;
    assert_eq!(
        frame.get("stompgate-presence-session"),
        Some(member_session.as_str())
    );
    assert_eq!(frame.get("stompgate-presence-user"), Some(ann.as_str()));
    assert_eq!(body["user"], ann.as_str());

    // Another key: not granted to ann, so neither is its presence.
    let mut refused = Client::open(&gw).await;
    refused.handshake(login()).await;
    refused
        .send_frame(&Frame::new("SUBSCRIBE").header("id", "x").header(
            "destination",
            format!("/presence/{}", unique("secret")).as_str(),
        ))
        .await;
    let error = refused.expect_error().await;
    assert_eq!(error.get("message"), Some("access refused"), "{error:?}");
    for client in [watcher, member] {
        client.disconnect().await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn presence_destinations_refuse_what_they_cannot_do() {
    common::require_rabbitmq().await;
    let gw = Gateway::start().await;
    let cases = [
        // A pattern has no members of its own.
        ("SUBSCRIBE", "/presence/news.*", "auto", "presence key"),
        // Its MESSAGEs are not the broker's: nothing to ack.
        ("SUBSCRIBE", "/presence/no01", "client", "ack:auto"),
        // Only the gateway sends presence events.
        ("SEND", "/presence/no01", "auto", "for SUBSCRIBE"),
    ];
    for (command, destination, ack, says) in cases {
        let (mut client, _) = Client::connect(&gw).await;
        client
            .send_frame(
                &Frame::new(command)
                    .header("id", "x")
                    .header("ack", ack)
                    .header("destination", destination),
            )
            .await;
        let error = client.expect_error().await;
        let text = String::from_utf8_lossy(&error.body).into_owned();
        assert!(text.contains(says), "{command} {destination}: {text}");
    }
    // Turned off: refused, naming the setting.
    let off = Gateway::start_with(|c| c.presence.enabled = false).await;
    let (mut client, _) = Client::connect(&off).await;
    client
        .send_frame(
            &Frame::new("SUBSCRIBE")
                .header("id", "x")
                .header("destination", "/presence/no01"),
        )
        .await;
    let error = client.expect_error().await;
    let text = String::from_utf8_lossy(&error.body).into_owned();
    assert!(text.contains("presence.enabled"), "{text}");
    gw.stop().await;
    off.stop().await;
}

/// Join and leave events `gw` published so far.
async fn events_published(gw: &Gateway) -> f64 {
    let metrics = scrape(gw).await;
    ["join", "leave"]
        .iter()
        .map(|op| {
            metrics
                .get(&format!(
                    "stompgate_presence_published_total{{op=\"{op}\"}}"
                ))
                .copied()
                .unwrap_or(0.0)
        })
        .sum()
}

/// A session of `gw` joins `marker` (which `watcher` watches) and leaves;
/// once the watcher has heard both, `gw` has published whatever was asked
/// of it before: its changes go out in order.
async fn marker_round(gw: &Gateway, marker: &str, watcher: &mut Client) {
    let (m, m_session) = reader(gw, marker).await;
    expect_event(watcher, "join", &m_session, None).await;
    m.disconnect().await;
    expect_event(watcher, "leave", &m_session, Some("disconnect")).await;
}

#[tokio::test]
async fn a_key_nobody_watches_costs_no_presence_message() {
    common::require_rabbitmq().await;
    let gw = Gateway::start().await;
    let watching_node = Gateway::start().await;
    let (key, marker) = (unique("paper"), unique("marker"));
    let (mut marker_watcher, _) = Client::connect(&watching_node).await;
    marker_watcher
        .subscribe("m", &format!("/presence/{marker}"))
        .await;
    expect(&mut marker_watcher, "snapshot").await;

    // Nobody watches the key: subscribing and leaving publish nothing.
    let before = events_published(&gw).await;
    let (mut a, _) = reader(&gw, &key).await;
    a.unsubscribe("paper").await;
    a.subscribe("paper", &format!("/topic/{key}")).await;
    marker_round(&gw, &marker, &mut marker_watcher).await;
    // The marker's join and leave alone.
    assert_eq!(events_published(&gw).await - before, 2.0);

    // Watched from another node: the member's node publishes its changes.
    let (mut watcher, _) = Client::connect(&watching_node).await;
    watcher.subscribe("who", &format!("/presence/{key}")).await;
    expect(&mut watcher, "snapshot").await;
    let before = events_published(&gw).await;
    let (b, b_session) = reader(&gw, &key).await;
    expect_event(&mut watcher, "join", &b_session, None).await;
    assert_eq!(events_published(&gw).await - before, 1.0);

    // Its last watcher gone, the node is told, and stops publishing them.
    watcher.unsubscribe("who").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let before = events_published(&gw).await;
        let (c, _) = reader(&gw, &key).await;
        c.disconnect().await;
        marker_round(&gw, &marker, &mut marker_watcher).await;
        // 2: the marker's alone; 4: the key's join and leave too.
        if events_published(&gw).await - before == 2.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a node still publishes a key's changes {WAIT:?} after its last watcher left"
        );
    }
    for client in [a, b, watcher, marker_watcher] {
        client.disconnect().await;
    }
    gw.stop().await;
    watching_node.stop().await;
}

#[tokio::test]
async fn changes_past_max_outbox_are_set_right_by_asking_again() {
    common::require_rabbitmq().await;
    let gw = Gateway::start_with(|c| c.presence.max_outbox = 1).await;
    let other = Gateway::start().await;
    let keys: Vec<String> = (0..3).map(|_| unique("paper")).collect();
    // Watchers on the member's own node and on another.
    let (mut near, _) = Client::connect(&gw).await;
    let (mut far, _) = Client::connect(&other).await;
    for (i, key) in keys.iter().enumerate() {
        for watcher in [&mut near, &mut far] {
            let id = format!("w{i}");
            watcher.subscribe(&id, &format!("/presence/{key}")).await;
            expect(watcher, "snapshot").await;
        }
    }
    let (mut member, session) = Client::connect(&gw).await;
    for (i, key) in keys.iter().enumerate() {
        member
            .subscribe(&format!("m{i}"), &format!("/topic/{key}"))
            .await;
    }
    /// The next `n` presence MESSAGEs, all of `kind` and of `session`:
    /// their destinations, sorted, and their reasons.
    async fn next_of(
        watcher: &mut Client,
        n: usize,
        kind: &str,
        session: &str,
    ) -> (Vec<String>, Vec<Option<String>>) {
        let mut destinations = Vec::new();
        let mut reasons = Vec::new();
        for _ in 0..n {
            let (frame, body) = expect(watcher, kind).await;
            assert_eq!(body["session"], session);
            destinations.push(frame.get("destination").unwrap().to_owned());
            reasons.push(body["reason"].as_str().map(str::to_owned));
        }
        destinations.sort();
        (destinations, reasons)
    }
    let mut want: Vec<String> = keys.iter().map(|k| format!("/presence/{k}")).collect();
    want.sort();
    for watcher in [&mut near, &mut far] {
        let (joined, _) = next_of(watcher, 3, "join", &session).await;
        assert_eq!(joined, want);
    }
    // Its three leaves are pushed at once, past presence.max_outbox: they
    // are dropped, and the answers to the questions asked again show the
    // session gone, on both nodes.
    member.disconnect().await;
    for watcher in [&mut near, &mut far] {
        let (left, reasons) = next_of(watcher, 3, "leave", &session).await;
        assert_eq!(left, want);
        assert!(
            reasons.iter().all(|r| r.as_deref() == Some("resync")),
            "{reasons:?}"
        );
    }
    let overflows = scrape(&gw).await["stompgate_presence_outbox_overflows_total"];
    assert!(overflows >= 1.0, "{overflows}");
    for client in [near, far] {
        client.disconnect().await;
    }
    gw.stop().await;
    other.stop().await;
}
