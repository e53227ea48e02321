//! What a client frame asks for ([`ClientCommand`], checked against the
//! session's STOMP version) and builders for the frames the server sends.

use bytes::Bytes;

use super::frame::Frame;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1_0,
    V1_1,
    V1_2,
}

impl Version {
    pub const ALL: [Version; 3] = [Version::V1_2, Version::V1_1, Version::V1_0];

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    /// The WebSocket subprotocol name, as offered by STOMP clients.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Version::V1_0 => "v10.stomp",
            Version::V1_1 => "v11.stomp",
            Version::V1_2 => "v12.stomp",
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Version> {
        Version::ALL.into_iter().find(|v| v.subprotocol() == name)
    }

    /// Highest version listed in an `accept-version` header.
    pub fn negotiate(accept_version: &str) -> Option<Version> {
        Version::ALL
            .into_iter()
            .find(|v| accept_version.split(',').any(|a| a.trim() == v.as_str()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    Auto,
    /// Cumulative: an ACK covers every earlier MESSAGE of the subscription.
    Client,
    ClientIndividual,
}

impl AckMode {
    pub fn needs_ack(self) -> bool {
        self != AckMode::Auto
    }
}

#[derive(Debug)]
pub struct Connect {
    pub accept_version: Option<String>,
    pub login: Option<String>,
    pub passcode: Option<String>,
    /// `(cx, cy)` in milliseconds: what the client sends, what it wants.
    pub heart_beat: (u64, u64),
}

#[derive(Debug)]
pub struct Send {
    pub destination: String,
    pub transaction: Option<String>,
    /// Every header, for the broker to map; STOMP's own are filtered there.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

#[derive(Debug)]
pub enum ClientCommand {
    Connect(Connect),
    Send(Send),
    Subscribe {
        id: String,
        destination: String,
        ack: AckMode,
    },
    Unsubscribe {
        id: String,
    },
    Ack {
        id: String,
        transaction: Option<String>,
    },
    Nack {
        id: String,
        transaction: Option<String>,
    },
    Begin {
        transaction: String,
    },
    Commit {
        transaction: String,
    },
    Abort {
        transaction: String,
    },
    Disconnect,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command {0:?}")]
    Unknown(String),
    #[error("{command} frame requires a {header:?} header")]
    MissingHeader {
        command: &'static str,
        header: &'static str,
    },
    #[error("invalid {header:?} header: {value:?}")]
    BadHeader { header: &'static str, value: String },
    #[error("{0} frame must not have a body")]
    UnexpectedBody(&'static str),
}

impl CommandError {
    pub fn summary(&self) -> &'static str {
        match self {
            CommandError::Unknown(_) => "unknown command",
            CommandError::MissingHeader { .. } => "missing header",
            CommandError::BadHeader { .. } => "invalid header",
            CommandError::UnexpectedBody(_) => "unexpected body",
        }
    }
}

impl ClientCommand {
    /// The STOMP command name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ClientCommand::Connect(_) => "CONNECT",
            ClientCommand::Send(_) => "SEND",
            ClientCommand::Subscribe { .. } => "SUBSCRIBE",
            ClientCommand::Unsubscribe { .. } => "UNSUBSCRIBE",
            ClientCommand::Ack { .. } => "ACK",
            ClientCommand::Nack { .. } => "NACK",
            ClientCommand::Begin { .. } => "BEGIN",
            ClientCommand::Commit { .. } => "COMMIT",
            ClientCommand::Abort { .. } => "ABORT",
            ClientCommand::Disconnect => "DISCONNECT",
        }
    }

    /// Reads a client frame under the rules of `version` (e.g. SUBSCRIBE
    /// needs an `id` from 1.1 on; ACK names its message by `id` in 1.2 and
    /// by `message-id` before).
    pub fn from_frame(frame: Frame, version: Version) -> Result<ClientCommand, CommandError> {
        fn required(
            frame: &Frame,
            command: &'static str,
            header: &'static str,
        ) -> Result<String, CommandError> {
            frame
                .get(header)
                .map(str::to_owned)
                .ok_or(CommandError::MissingHeader { command, header })
        }
        let transaction = frame.get("transaction").map(str::to_owned);
        let command = match frame.command.as_str() {
            "CONNECT" | "STOMP" => {
                let heart_beat = match frame.get("heart-beat") {
                    None => (0, 0),
                    Some(value) => parse_heart_beat(value).ok_or(CommandError::BadHeader {
                        header: "heart-beat",
                        value: value.to_owned(),
                    })?,
                };
                ClientCommand::Connect(Connect {
                    accept_version: frame.get("accept-version").map(str::to_owned),
                    login: frame.get("login").map(str::to_owned),
                    passcode: frame.get("passcode").map(str::to_owned),
                    heart_beat,
                })
            }
            "SEND" => ClientCommand::Send(Send {
                destination: required(&frame, "SEND", "destination")?,
                transaction,
                headers: frame.headers,
                body: frame.body,
            }),
            "SUBSCRIBE" => {
                let destination = required(&frame, "SUBSCRIBE", "destination")?;
                let id = match frame.get("id") {
                    Some(id) => id.to_owned(),
                    // STOMP 1.0 made the id optional; the destination
                    // then names the subscription, as RabbitMQ does.
                    None if version == Version::V1_0 => destination.clone(),
                    None => {
                        return Err(CommandError::MissingHeader {
                            command: "SUBSCRIBE",
                            header: "id",
                        })
                    }
                };
                let ack = match frame.get("ack").unwrap_or("auto") {
                    "auto" => AckMode::Auto,
                    "client" => AckMode::Client,
                    "client-individual" => AckMode::ClientIndividual,
                    other => {
                        return Err(CommandError::BadHeader {
                            header: "ack",
                            value: other.to_owned(),
                        })
                    }
                };
                ClientCommand::Subscribe {
                    id,
                    destination,
                    ack,
                }
            }
            "UNSUBSCRIBE" => {
                let id = match (frame.get("id"), version) {
                    (Some(id), _) => id.to_owned(),
                    (None, Version::V1_0) => required(&frame, "UNSUBSCRIBE", "destination")?,
                    (None, _) => required(&frame, "UNSUBSCRIBE", "id")?,
                };
                ClientCommand::Unsubscribe { id }
            }
            "ACK" => ClientCommand::Ack {
                id: required(&frame, "ACK", ack_id_header(version))?,
                transaction,
            },
            "NACK" => ClientCommand::Nack {
                id: required(&frame, "NACK", ack_id_header(version))?,
                transaction,
            },
            "BEGIN" => ClientCommand::Begin {
                transaction: required(&frame, "BEGIN", "transaction")?,
            },
            "COMMIT" => ClientCommand::Commit {
                transaction: required(&frame, "COMMIT", "transaction")?,
            },
            "ABORT" => ClientCommand::Abort {
                transaction: required(&frame, "ABORT", "transaction")?,
            },
            "DISCONNECT" => ClientCommand::Disconnect,
            other => return Err(CommandError::Unknown(other.to_owned())),
        };
        Ok(command)
    }
}

/// STOMP 1.2 names the message to ACK by `id` (MESSAGE's `ack` header);
/// 1.0 and 1.1 by `message-id`.
fn ack_id_header(version: Version) -> &'static str {
    if version == Version::V1_2 {
        "id"
    } else {
        "message-id"
    }
}

fn parse_heart_beat(value: &str) -> Option<(u64, u64)> {
    let (cx, cy) = value.split_once(',')?;
    Some((cx.trim().parse().ok()?, cy.trim().parse().ok()?))
}

/// Name and version sent in CONNECTED's `server` header.
pub const SERVER: &str = concat!("stompgate/", env!("CARGO_PKG_VERSION"));

pub fn connected(version: Version, heart_beat: (u64, u64), session: &str) -> Frame {
    Frame::new("CONNECTED")
        .header("version", version.as_str())
        .header("heart-beat", format!("{},{}", heart_beat.0, heart_beat.1))
        .header("session", session)
        .header("server", SERVER)
}

pub fn receipt(receipt_id: &str) -> Frame {
    Frame::new("RECEIPT").header("receipt-id", receipt_id)
}

/// ERROR with a short `message` and the detail in a text body.
/// `message` is one of a fixed set of reasons (it labels a metric).
pub fn error(message: &'static str, detail: &str, receipt_id: Option<&str>) -> Frame {
    let mut frame = Frame::new("ERROR")
        .header("message", message)
        .header("content-type", "text/plain");
    if let Some(id) = receipt_id {
        frame = frame.header("receipt-id", id);
    }
    frame.body(Bytes::copy_from_slice(detail.as_bytes()))
}
