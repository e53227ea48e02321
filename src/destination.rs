//! STOMP destinations → RabbitMQ routes (`/topic/no01` → exchange
//! `amq.topic`, key `no01`), and AMQP topic matching of routing keys
//! against binding keys (`*` one word, `#` zero or more).

use std::fmt;

/// Longest exchange name or routing key AMQP 0-9-1 can carry (a shortstr).
pub const MAX_AMQP_NAME: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub exchange: String,
    pub key: String,
}

/// A parsed destination: where it routes, and the prefix that MESSAGE
/// frames put back in front of a delivery's routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub prefix: String,
    pub route: Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Subscribe,
    Send,
}

impl fmt::Display for Use {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Use::Subscribe => "SUBSCRIBE",
            Use::Send => "SEND",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error(
        "unsupported destination {0:?}: use /topic/<key>, /sub/<key> (SUBSCRIBE), \
         /pub/<key> (SEND), /exchange/<name>/<key>, /user/queue/<name>, /user/topic/<name> \
         or /user/exchange/<exchange>/<name> (SUBSCRIBE), the same after /user/<user> or \
         /session/<id> (SEND), /presence/<key> (SUBSCRIBE)"
    )]
    Unsupported(String),
    #[error("{usage} cannot use {dest:?}: {hint}")]
    WrongDirection {
        usage: Use,
        dest: String,
        hint: &'static str,
    },
    #[error("destination {0:?} has no routing key")]
    EmptyKey(String),
    #[error("destination {0:?} names no exchange")]
    EmptyExchange(String),
    #[error("routing key or exchange in {0:?} is longer than AMQP's 255 bytes")]
    TooLong(String),
    #[error("SEND to {0:?}: a routing key cannot contain the wildcards '*' or '#'")]
    WildcardInSend(String),
    #[error(
        "{0:?}: a user, session id or queue name in an addressed destination is 1 to 100 \
         bytes without '.', '*', '#' or '/'"
    )]
    AddressWord(String),
    #[error(
        "{0:?}: a presence key is 1 to 240 bytes without '*' or '#' (the members of one \
         routing key, not of a pattern)"
    )]
    PresenceKey(String),
}

impl Destination {
    /// Parses `dest` for a SUBSCRIBE or a SEND; `exchange` backs `/topic/`,
    /// `/sub/` and `/pub/`.
    pub fn parse(dest: &str, usage: Use, exchange: &str) -> Result<Destination, DestinationError> {
        let (prefix, exchange, key) = if let Some(key) = dest.strip_prefix("/topic/") {
            ("/topic/", exchange, key)
        } else if let Some(key) = dest.strip_prefix("/sub/") {
            if usage == Use::Send {
                return Err(DestinationError::WrongDirection {
                    usage,
                    dest: dest.to_owned(),
                    hint: "/sub/ is for SUBSCRIBE; send to /pub/<key> or /topic/<key>",
                });
            }
            ("/sub/", exchange, key)
        } else if let Some(key) = dest.strip_prefix("/pub/") {
            if usage == Use::Subscribe {
                return Err(DestinationError::WrongDirection {
                    usage,
                    dest: dest.to_owned(),
                    hint: "/pub/ is for SEND; subscribe to /sub/<key> or /topic/<key>",
                });
            }
            ("/pub/", exchange, key)
        } else if dest.starts_with("/presence/") && usage == Use::Send {
            return Err(DestinationError::WrongDirection {
                usage,
                dest: dest.to_owned(),
                hint: "/presence/ is for SUBSCRIBE: the gateway sends its events",
            });
        } else if let Some(rest) = dest.strip_prefix("/exchange/") {
            let Some((name, key)) = rest.split_once('/') else {
                return Err(DestinationError::EmptyKey(dest.to_owned()));
            };
            if name.is_empty() {
                return Err(DestinationError::EmptyExchange(dest.to_owned()));
            }
            (&dest[..10 + name.len() + 1], name, key)
        } else {
            return Err(DestinationError::Unsupported(dest.to_owned()));
        };
        if key.is_empty() {
            return Err(DestinationError::EmptyKey(dest.to_owned()));
        }
        if key.len() > MAX_AMQP_NAME || exchange.len() > MAX_AMQP_NAME {
            return Err(DestinationError::TooLong(dest.to_owned()));
        }
        if usage == Use::Send && key.contains(['*', '#']) {
            return Err(DestinationError::WildcardInSend(dest.to_owned()));
        }
        Ok(Destination {
            prefix: prefix.to_owned(),
            route: Route {
                exchange: exchange.to_owned(),
                key: key.to_owned(),
            },
        })
    }
}

/// An addressed SEND (the seed's `receiver`): to every session of a user
/// subscribed to the inbox, or to one session's. `inbox` is the inbox's
/// key (see [`user_inbox`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressed {
    User { user: String, inbox: String },
    Session { id: String, inbox: String },
}

impl Addressed {
    /// `/user/<user>/<inbox>` or `/session/<id>/<inbox>`, the inbox as in
    /// [`user_inbox`]; None for any other destination.
    pub fn parse_send(dest: &str) -> Option<Result<Addressed, DestinationError>> {
        let (user, rest) = if let Some(rest) = dest.strip_prefix("/user/") {
            (true, rest)
        } else {
            (false, dest.strip_prefix("/session/")?)
        };
        // `/user/queue/<name>` is what a client subscribes to, not where
        // one sends (so users named queue, topic or exchange cannot be
        // addressed).
        if user && inbox_key(dest, rest).is_some() {
            return Some(Err(DestinationError::WrongDirection {
                usage: Use::Send,
                dest: dest.to_owned(),
                hint: "/user/queue/<name> (or topic/, exchange/) is for SUBSCRIBE; \
                       send to /user/<user>/queue/<name>",
            }));
        }
        let parsed = rest
            .split_once('/')
            .and_then(|(who, tail)| Some((who, inbox_key(dest, tail)?)))
            .ok_or_else(|| DestinationError::Unsupported(dest.to_owned()))
            .and_then(|(who, inbox)| {
                let who = address_word(dest, who)?.to_owned();
                let inbox = inbox?;
                Ok(match user {
                    true => Addressed::User { user: who, inbox },
                    false => Addressed::Session { id: who, inbox },
                })
            });
        Some(parsed)
    }

    /// Where it goes on the direct exchange.
    pub fn route(&self, direct_exchange: &str) -> Route {
        match self {
            Addressed::User { user, inbox } => user_route(direct_exchange, user, inbox),
            Addressed::Session { id, inbox } => session_route(direct_exchange, id, inbox),
        }
    }
}

/// The inbox key of a SUBSCRIBE to one of Spring's user destinations:
/// `/user/queue/<name>` → `<name>`, `/user/topic/<name>` →
/// `topic.<name>`, `/user/exchange/<exchange>/<name>` →
/// `exchange.<exchange>.<name>`. None for any other destination.
pub fn user_inbox(dest: &str) -> Option<Result<String, DestinationError>> {
    inbox_key(dest, dest.strip_prefix("/user/")?)
}

/// See [`user_inbox`]: `tail` is what follows `/user/`, `/user/<user>/`
/// or `/session/<id>/`. Keys of different forms never meet: a queue's
/// has one word, a topic's two, an exchange's three or more.
fn inbox_key(dest: &str, tail: &str) -> Option<Result<String, DestinationError>> {
    if let Some(name) = tail.strip_prefix("queue/") {
        return Some(address_word(dest, name).map(str::to_owned));
    }
    if let Some(name) = tail.strip_prefix("topic/") {
        return Some(address_word(dest, name).map(|name| format!("topic.{name}")));
    }
    let rest = tail.strip_prefix("exchange/")?;
    let bad = || DestinationError::AddressWord(dest.to_owned());
    let key = rest
        .split_once('/')
        .ok_or_else(bad)
        .and_then(|(exchange, name)| {
            let name = address_word(dest, name)?;
            let words_ok = exchange.split('.').all(|w| !w.is_empty());
            if !words_ok || exchange.len() > 100 || exchange.contains(['*', '#']) {
                return Err(bad());
            }
            Ok(format!("exchange.{exchange}.{name}"))
        });
    Some(key)
}

/// Longest presence key: `presence.event.<key>` must fit a routing key.
pub const MAX_PRESENCE_KEY: usize = 240;

/// The `<key>` of a SUBSCRIBE to `/presence/<key>`: whose members it
/// watches (sessions subscribed to `/topic/<key>` or `/sub/<key>`); None
/// for any other destination.
pub fn presence_key(dest: &str) -> Option<Result<&str, DestinationError>> {
    let key = dest.strip_prefix("/presence/")?;
    if key.is_empty() || key.len() > MAX_PRESENCE_KEY || key.contains(['*', '#']) {
        return Some(Err(DestinationError::PresenceKey(dest.to_owned())));
    }
    Some(Ok(key))
}

/// The binding that brings a user's messages for an inbox.
pub fn user_route(direct_exchange: &str, user: &str, inbox: &str) -> Route {
    Route {
        exchange: direct_exchange.to_owned(),
        key: format!("user.{user}.{inbox}"),
    }
}

/// The binding that brings one session's messages for an inbox.
pub fn session_route(direct_exchange: &str, id: &str, inbox: &str) -> Route {
    Route {
        exchange: direct_exchange.to_owned(),
        key: format!("session.{id}.{inbox}"),
    }
}

/// A user, session id or queue name in an addressed destination: one
/// routing-key word (no `.`, `*` or `#`), so that no two addresses share
/// a key, and short enough for the key to fit AMQP's 255 bytes.
pub fn address_word<'a>(dest: &str, word: &'a str) -> Result<&'a str, DestinationError> {
    if word.is_empty() || word.contains(['.', '*', '#', '/']) {
        return Err(DestinationError::AddressWord(dest.to_owned()));
    }
    if word.len() > 100 {
        return Err(DestinationError::TooLong(dest.to_owned()));
    }
    Ok(word)
}

/// Whether `routing_key` matches binding key `pattern` under AMQP topic
/// rules. Words are separated by '.'; `*` matches one word, `#` zero or more.
///
/// Dynamic programming over words, so a pattern with many `#` stays linear
/// in (pattern words × key words) instead of backtracking exponentially.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    // The common case, checked for every delivery: no wildcard at all.
    if !pattern.split('.').any(|word| word == "*" || word == "#") {
        return pattern == routing_key;
    }
    // As RabbitMQ splits them: the empty key has no words (not one empty
    // word), so `#` matches it and `*` does not.
    fn words(s: &str) -> Vec<&str> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split('.').collect()
        }
    }
    let pattern = words(pattern);
    let key = words(routing_key);
    // row[j]: the pattern words seen so far match the first j key words.
    let mut row = vec![false; key.len() + 1];
    row[0] = true;
    for word in &pattern {
        let mut next = vec![false; key.len() + 1];
        if *word == "#" {
            let mut reachable = false;
            for j in 0..=key.len() {
                reachable |= row[j];
                next[j] = reachable;
            }
        } else {
            for j in 1..=key.len() {
                next[j] = row[j - 1] && (*word == "*" || *word == key[j - 1]);
            }
        }
        row = next;
    }
    row[key.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        let cases = [
            ("no01", "no01", true),
            ("no01", "no02", false),
            ("*", "no01", true),
            ("*", "a.b", false),
            ("#", "a.b.c", true),
            ("#", "", true),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.b.x.c", true),
            ("a.#.c", "a.b.x.d", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("#.#", "x", true),
            ("*.#", "", false),
            ("*", "", false),
            ("", "", true),
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            ("news.*", "news.sport", true),
            ("news.*", "news.sport.football", false),
            // Only whole words are wildcards.
            ("a*.b", "a*.b", true),
            ("a*", "ab", false),
            ("a.#x", "a.b", false),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(topic_matches(pattern, key), expected, "{pattern} vs {key}");
        }
    }

    #[test]
    fn destinations_map_to_routes() {
        let d = Destination::parse("/sub/no01", Use::Subscribe, "amq.topic").unwrap();
        assert_eq!((d.prefix.as_str(), d.route.key.as_str()), ("/sub/", "no01"));
        let d = Destination::parse("/exchange/logs/a.b", Use::Send, "amq.topic").unwrap();
        assert_eq!(d.prefix, "/exchange/logs/");
        assert_eq!(d.route.exchange, "logs");
        assert!(matches!(
            Destination::parse("/pub/x", Use::Subscribe, "amq.topic"),
            Err(DestinationError::WrongDirection { .. })
        ));
        assert!(matches!(
            Destination::parse("/topic/a.*", Use::Send, "amq.topic"),
            Err(DestinationError::WildcardInSend(_))
        ));
        let long = format!("/topic/{}", "k".repeat(256));
        assert!(matches!(
            Destination::parse(&long, Use::Subscribe, "amq.topic"),
            Err(DestinationError::TooLong(_))
        ));
        assert!(matches!(
            Destination::parse("/queue/x", Use::Send, "amq.topic"),
            Err(DestinationError::Unsupported(_))
        ));
    }
}

#[cfg(test)]
mod addressed_tests {
    use super::*;

    #[test]
    fn addressed_sends_map_to_one_key_each() {
        let parse = |d: &str| Addressed::parse_send(d).unwrap();
        let ann = parse("/user/ann/queue/inbox").unwrap();
        assert_eq!(
            ann.route("stompgate.direct"),
            Route {
                exchange: "stompgate.direct".into(),
                key: "user.ann.inbox".into()
            }
        );
        let session = parse("/session/0a1b2c3d4e5f/queue/inbox").unwrap();
        assert_eq!(
            session.route("d").key,
            "session.0a1b2c3d4e5f.inbox".to_owned()
        );
        // A dot would let "a.b"+"c" and "a"+"b.c" share a key.
        for bad in [
            "/user/a.b/queue/c",
            "/user/a/queue/b.c",
            "/user/*/queue/x",
            "/user/a/queue/#",
            "/user//queue/x",
            "/session/x/queue/",
        ] {
            assert!(
                matches!(parse(bad), Err(DestinationError::AddressWord(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("/user/queue/inbox"),
            Err(DestinationError::WrongDirection { .. })
        ));
        assert!(matches!(
            parse("/user/ann/other/x"),
            Err(DestinationError::Unsupported(_))
        ));
        assert!(Addressed::parse_send("/topic/x").is_none());
        // Spring's other two forms, each with keys of its own.
        let topic = parse("/user/ann/topic/news").unwrap();
        assert_eq!(topic.route("d").key, "user.ann.topic.news");
        let exchange = parse("/session/s1/exchange/amq.direct/news").unwrap();
        assert_eq!(
            exchange.route("d").key,
            "session.s1.exchange.amq.direct.news"
        );
        for bad in [
            "/user/ann/exchange/a..b/n",
            "/user/ann/exchange/amq.*/n",
            "/user/ann/exchange/amq.direct",
        ] {
            assert!(
                matches!(parse(bad), Err(DestinationError::AddressWord(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("/user/topic/news"),
            Err(DestinationError::WrongDirection { .. })
        ));
    }

    #[test]
    fn presence_keys_are_literal_routing_keys() {
        assert_eq!(presence_key("/presence/no01"), Some(Ok("no01")));
        assert_eq!(presence_key("/presence/news.sport"), Some(Ok("news.sport")));
        for bad in ["/presence/", "/presence/news.*", "/presence/#"] {
            assert!(
                matches!(
                    presence_key(bad),
                    Some(Err(DestinationError::PresenceKey(_)))
                ),
                "{bad}"
            );
        }
        let long = format!("/presence/{}", "k".repeat(MAX_PRESENCE_KEY + 1));
        assert!(presence_key(&long).unwrap().is_err());
        assert_eq!(presence_key("/topic/no01"), None);
        assert!(matches!(
            Destination::parse("/presence/no01", Use::Send, "amq.topic"),
            Err(DestinationError::WrongDirection { .. })
        ));
    }

    #[test]
    fn user_inboxes_are_subscribed_by_name() {
        assert_eq!(user_inbox("/user/queue/inbox"), Some(Ok("inbox".into())));
        assert_eq!(
            user_inbox("/user/topic/inbox"),
            Some(Ok("topic.inbox".into()))
        );
        assert_eq!(
            user_inbox("/user/exchange/amq.direct/inbox"),
            Some(Ok("exchange.amq.direct.inbox".into()))
        );
        assert!(matches!(
            user_inbox("/user/queue/a.b"),
            Some(Err(DestinationError::AddressWord(_)))
        ));
        assert_eq!(user_inbox("/topic/inbox"), None);
        assert_eq!(user_inbox("/user/ann/queue/inbox"), None);
        assert_eq!(user_route("d", "ann", "inbox").key, "user.ann.inbox");
        assert_eq!(session_route("d", "s1", "inbox").key, "session.s1.inbox");
    }
}
