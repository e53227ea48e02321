//! Who sent a message (issue 16, the seed's `sender`): every MESSAGE made
//! from a STOMP SEND carries the sending session's id and its
//! authenticated user, set by the gateway. A client's own
//! `stompgate-sender-*` headers are replaced; AMQP consumers see the same
//! headers with `user_id` naming the gateway's AMQP user; a plain AMQP
//! publisher's message carries none, even when it sets them itself.

mod common;

use std::sync::OnceLock;

use common::{amqp_channel, amqp_consumer, unique, Client, Gateway, WAIT};
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use stompgate::auth::{hash_password, AuthMode, UserConfig};
use stompgate::stomp::frame::Frame;

const SESSION: &str = "stompgate-sender-session";
const USER: &str = "stompgate-sender-user";

/// Every value of header `name` on `frame` (a repeated header would read
/// as its first value to most clients).
fn all<'a>(frame: &'a Frame, name: &str) -> Vec<&'a str> {
    frame
        .headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A reader subscribed to a fresh topic, and a writer with its session id.
async fn reader_and_writer(
    gw: &Gateway,
    writer_connect: Frame,
) -> (String, Client, Client, String) {
    let dest = format!("/topic/{}", unique("sender"));
    let (mut reader, _) = Client::connect(gw).await;
    reader.subscribe("s", &dest).await;
    let mut writer = Client::open(gw).await;
    let session = writer.handshake(writer_connect).await;
    (dest, reader, writer, session)
}

fn connect_frame() -> Frame {
    Frame::new("CONNECT").header("accept-version", "1.2")
}

fn forged_send(dest: &str) -> Frame {
    Frame::new("SEND")
        .header("destination", dest)
        .header(SESSION, "someone-else")
        .header(USER, "root")
        .body(&b"who am I?"[..])
}

#[tokio::test]
async fn messages_carry_the_sending_session_which_a_client_cannot_forge() {
    let gw = Gateway::start().await;
    // auth.mode = "none": a login is only a claim, so no user is passed on.
    let claimed = connect_frame().header("login", "root");
    let (dest, mut reader, mut writer, session) = reader_and_writer(&gw, claimed).await;
    writer.send_frame(&forged_send(&dest)).await;
    let message = reader.recv_message().await;
    assert_eq!(all(&message, SESSION), [session.as_str()]);
    assert_eq!(all(&message, USER), Vec::<&str>::new());
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

#[tokio::test]
async fn messages_carry_the_authenticated_user() {
    static HASH: OnceLock<String> = OnceLock::new();
    let hash = HASH.get_or_init(|| hash_password("pass").unwrap()).clone();
    let gw = Gateway::start_with(move |c| {
        c.auth.mode = AuthMode::Users;
        c.auth.users = vec![UserConfig {
            name: "editor".into(),
            password_hash: hash,
            subscribe: vec!["#".into()],
            publish: vec!["#".into()],
        }];
    })
    .await;
    let login = |frame: Frame| frame.header("login", "editor").header("passcode", "pass");
    let dest = format!("/topic/{}", unique("sender"));
    let mut reader = Client::open(&gw).await;
    reader.handshake(login(connect_frame())).await;
    reader.subscribe("s", &dest).await;
    let mut writer = Client::open(&gw).await;
    let session = writer.handshake(login(connect_frame())).await;
    writer.send_frame(&forged_send(&dest)).await;
    let message = reader.recv_message().await;
    assert_eq!(all(&message, SESSION), [session.as_str()]);
    assert_eq!(all(&message, USER), ["editor"]);
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}

/// AMQP consumers get the sender as AMQP headers, with `user_id` the
/// gateway's AMQP user (which RabbitMQ checked); a plain AMQP publisher
/// that sets the sender headers itself, without publishing as the
/// gateway's user, reaches STOMP readers without them.
#[tokio::test]
async fn amqp_clients_see_the_sender_and_cannot_forge_it() {
    let gw = Gateway::start().await;
    let (dest, mut reader, mut writer, session) = reader_and_writer(&gw, connect_frame()).await;
    let key = dest.trim_start_matches("/topic/").to_owned();
    let (connection, channel) = amqp_channel().await;
    let mut consumer = amqp_consumer(&channel, &key).await;
    writer.send_frame(&forged_send(&dest)).await;
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("an AMQP delivery within the wait")
        .unwrap()
        .unwrap();
    let p = &delivery.properties;
    assert_eq!(p.user_id().as_ref().map(|u| u.as_str()), Some("guest"));
    let headers = p.headers().as_ref().expect("AMQP headers").inner();
    assert_eq!(
        headers.get(SESSION),
        Some(&AMQPValue::LongString(LongString::from(session.as_str())))
    );
    assert_eq!(headers.get(USER), None);
    reader.recv_message().await;

    // A plain AMQP publisher claiming to be a session.
    let mut forged = FieldTable::default();
    forged.insert(
        ShortString::from(SESSION),
        AMQPValue::LongString(LongString::from("someone-else")),
    );
    channel
        .basic_publish(
            "amq.topic".into(),
            key.as_str().into(),
            BasicPublishOptions::default(),
            b"from AMQP",
            BasicProperties::default().with_headers(forged),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let message = reader.recv_message().await;
    assert_eq!(&message.body[..], b"from AMQP");
    assert_eq!(all(&message, SESSION), Vec::<&str>::new());
    connection.close(200, "done".into()).await.unwrap();
    reader.disconnect().await;
    writer.disconnect().await;
    gw.stop().await;
}
