//! What agents say to each other: JSON bodies on `amqp.direct_exchange`,
//! under routing keys that start with `presence.`.

use serde::{Deserialize, Serialize};

use super::{Reason, User};

/// Every agent's queue is bound to it: beats, and bye.
pub(super) const BEATS: &str = "presence.beat";
/// Every agent's queue is bound to it: questions about a key.
pub(super) const QUESTIONS: &str = "presence.query";

/// One node's own key: answers, and what is said to it alone.
pub(super) fn node_key(node: &str) -> String {
    format!("presence.node.{node}")
}

/// A watched key's joins and leaves.
pub(super) fn event_key(key: &str) -> String {
    format!("presence.event.{key}")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(super) enum Said {
    /// `node` is alive. `hello`: it just (re)connected and may have missed
    /// what was said: whoever watches a key asks it again.
    Beat { node: String, hello: bool },
    /// `node` is stopping: its members go now, not at its timeout.
    Bye { node: String },
    /// `node` watches `key`: publish its changes, and answer with its
    /// members.
    Query { node: String, key: String },
    /// `node` no longer watches `key`.
    Unwatch { node: String, key: String },
    /// `node`'s members of `key`, all of them unless `truncated`.
    Answer {
        node: String,
        key: String,
        members: Vec<(String, User)>,
        truncated: bool,
    },
    Join {
        node: String,
        key: String,
        session: String,
        user: User,
    },
    Leave {
        node: String,
        key: String,
        session: String,
        reason: Reason,
    },
}

impl Said {
    /// What it is, as the metrics count it.
    pub(super) fn op(&self) -> &'static str {
        match self {
            Said::Beat { .. } => "beat",
            Said::Bye { .. } => "bye",
            Said::Query { .. } => "query",
            Said::Unwatch { .. } => "unwatch",
            Said::Answer { .. } => "answer",
            Said::Join { .. } => "join",
            Said::Leave { .. } => "leave",
        }
    }

    /// Who said it.
    pub(super) fn node(&self) -> &str {
        match self {
            Said::Beat { node, .. }
            | Said::Bye { node }
            | Said::Query { node, .. }
            | Said::Unwatch { node, .. }
            | Said::Answer { node, .. }
            | Said::Join { node, .. }
            | Said::Leave { node, .. } => node,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_said_reads_back_the_same() {
        let said = [
            Said::Beat {
                node: "n1".into(),
                hello: true,
            },
            Said::Answer {
                node: "n1".into(),
                key: "no01".into(),
                members: vec![("s1".into(), Some("ann".into())), ("s2".into(), None)],
                truncated: false,
            },
            Said::Leave {
                node: "n1".into(),
                key: "no01".into(),
                session: "s1".into(),
                reason: Reason::NodeLost,
            },
        ];
        for said in said {
            let json = serde_json::to_string(&said).unwrap();
            assert_eq!(serde_json::from_str::<Said>(&json).unwrap(), said, "{json}");
        }
        let json = serde_json::to_string(&said_leave()).unwrap();
        assert!(json.contains(r#""op":"leave""#), "{json}");
        assert!(json.contains(r#""reason":"node-lost""#), "{json}");
    }

    fn said_leave() -> Said {
        Said::Leave {
            node: "n".into(),
            key: "k".into(),
            session: "s".into(),
            reason: Reason::NodeLost,
        }
    }
}
