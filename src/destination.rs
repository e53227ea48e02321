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
         /pub/<key> (SEND) or /exchange/<name>/<key>"
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
