//! Who may connect (`auth.mode`), and what each may read and write: grants
//! of topic patterns for SUBSCRIBE and for SEND, checked per frame.
//!
//! A grant is a binding-key pattern (`no01`, `news.*`, `#`) on the exchange
//! behind /topic/, /sub/ and /pub/, or `<exchange>/<pattern>` for
//! `/exchange/<exchange>/…`. A wildcard SUBSCRIBE is allowed only when
//! everything it could receive is granted: `news.*` does not cover `#`.

mod passwords;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use argon2::password_hash::PasswordHash;
use argon2::Argon2;
use serde::Deserialize;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::destination::Route;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Everyone may connect and use every destination (local development).
    None,
    /// CONNECT's login/passcode against `auth.users` (argon2 hashes).
    Users,
    /// A JSON Web Token in CONNECT's passcode, an `Authorization: Bearer`
    /// header or an `access_token` query parameter on the upgrade; grants
    /// come from its `stomp` claim, and its `exp` ends the connection.
    Jwt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub users: Vec<UserConfig>,
    pub jwt: JwtConfig,
    /// Password checks running at once; 0: one per CPU core.
    pub max_concurrent_logins: usize,
    /// Password checks waiting for their turn; beyond, "try again later".
    pub max_pending_logins: usize,
    /// Failed logins a client address (IPv6: its /64) or a user name may
    /// have within `failed_login_window` before it is refused unchecked.
    pub failed_login_limit: u32,
    #[serde(with = "humantime_serde")]
    pub failed_login_window: std::time::Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// HS256, RS256 or ES256.
    pub algorithm: String,
    /// The shared secret, for HS256.
    pub secret: String,
    /// A PEM public key file, for RS256 and ES256.
    pub public_key_file: String,
    /// When not empty, the `iss` a token must carry.
    pub issuer: String,
    /// When not empty, the `aud` a token must carry.
    pub audience: String,
    /// How far ahead of this node's clock a token's `nbf` may be: the
    /// issuer's clock may run a little fast.
    #[serde(with = "humantime_serde")]
    pub nbf_leeway: std::time::Duration,
}

/// The claims stompgate reads from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Seconds since the Unix epoch; required.
    exp: u64,
    /// Not before, in seconds since the Unix epoch; checked when present.
    nbf: Option<u64>,
    #[serde(default)]
    stomp: StompClaim,
}

/// `"stomp": {"subscribe": [...], "publish": [...]}`: grant patterns as in
/// `auth.users`. A token without it may connect but use no destination.
#[derive(Debug, Default, Deserialize)]
struct StompClaim {
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Who a connection is, once authenticated.
pub struct Identity {
    pub user: Option<String>,
    pub grants: Arc<Grants>,
    /// When the credentials stop being valid (a token's `exp`).
    pub expires: Option<std::time::SystemTime>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// A PHC string from `stompgate hash-password`.
    pub password_hash: String,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
}

/// A grant pattern, parsed.
#[derive(Debug, Clone)]
struct Pattern {
    /// None: the default exchange (`amqp.exchange`).
    exchange: Option<String>,
    words: Vec<String>,
}

impl Pattern {
    fn parse(text: &str) -> Pattern {
        let (exchange, key) = match text.split_once('/') {
            Some((exchange, key)) => (Some(exchange.to_owned()), key),
            None => (None, text),
        };
        Pattern {
            exchange,
            words: words(key).map(str::to_owned).collect(),
        }
    }

    fn exchange_is(&self, route: &Route, default_exchange: &str) -> bool {
        self.exchange.as_deref().unwrap_or(default_exchange) == route.exchange
    }
}

fn words(key: &str) -> impl Iterator<Item = &str> {
    key.split('.').filter(|_| !key.is_empty())
}

/// Whether every routing key that binding key `wanted` matches is also
/// matched by grant `granted`. Dynamic programming over words: a granted
/// `#` takes any run of wanted words, a granted `*` one wanted word that
/// is not `#`, a literal only the same literal.
fn covers(granted: &[String], wanted: &[&str]) -> bool {
    let mut row = vec![false; wanted.len() + 1];
    row[0] = true;
    for g in granted {
        let mut next = vec![false; wanted.len() + 1];
        if g == "#" {
            let mut reachable = false;
            for j in 0..=wanted.len() {
                reachable |= row[j];
                next[j] = reachable;
            }
        } else {
            for j in 1..=wanted.len() {
                let w = wanted[j - 1];
                let fits = if g == "*" { w != "#" } else { w == g };
                next[j] = row[j - 1] && fits;
            }
        }
        row = next;
    }
    row[wanted.len()]
}

/// What one connection may do.
#[derive(Debug)]
pub struct Grants {
    /// `auth.mode = "none"`: every destination (that the other rules,
    /// like amqp.allowed_exchanges, let through).
    unrestricted: bool,
    default_exchange: String,
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
}

impl Grants {
    fn everything(default_exchange: &str) -> Grants {
        Grants {
            unrestricted: true,
            ..Grants::new(default_exchange, &[], &[])
        }
    }

    fn new(default_exchange: &str, subscribe: &[String], publish: &[String]) -> Grants {
        Grants {
            unrestricted: false,
            default_exchange: default_exchange.to_owned(),
            subscribe: subscribe.iter().map(|p| Pattern::parse(p)).collect(),
            publish: publish.iter().map(|p| Pattern::parse(p)).collect(),
        }
    }

    /// A pattern without an exchange applies to the default exchange only.
    fn allows(&self, patterns: &[Pattern], route: &Route) -> bool {
        if self.unrestricted {
            return true;
        }
        let wanted: Vec<&str> = words(&route.key).collect();
        patterns
            .iter()
            .any(|p| p.exchange_is(route, &self.default_exchange) && covers(&p.words, &wanted))
    }

    pub fn may_subscribe(&self, route: &Route) -> bool {
        self.allows(&self.subscribe, route)
    }

    pub fn may_publish(&self, route: &Route) -> bool {
        self.allows(&self.publish, route)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong login or passcode, or none given: the client learns nothing
    /// more than this.
    #[error("access refused")]
    Refused,
    /// Too many password checks wait already.
    #[error("too many logins are being checked: try again later")]
    Busy,
    /// Too many failed logins from the address or for the user lately.
    #[error("too many failed logins from this address or for this user: try again later")]
    Throttled,
}

impl AuthError {
    /// The ERROR's `message` header.
    pub fn summary(&self) -> &'static str {
        match self {
            AuthError::Refused => "access refused",
            AuthError::Busy | AuthError::Throttled => "try again later",
        }
    }

    /// The refusal's label in `refusals_total{limit}`.
    pub fn limit(&self) -> &'static str {
        match self {
            AuthError::Refused => "auth",
            AuthError::Busy => "auth.max_pending_logins",
            AuthError::Throttled => "auth.failed_login_limit",
        }
    }
}

struct User {
    hash: String,
    grants: Arc<Grants>,
}

pub struct Auth {
    mode: AuthMode,
    users: HashMap<String, User>,
    open: Arc<Grants>,
    jwt: Option<(DecodingKey, Validation)>,
    nbf_leeway: std::time::Duration,
    default_exchange: String,
    passwords: passwords::Checker,
}

/// Tokens that claim to last longer than this are refused: no issuer
/// means it, and such an `exp` could not be represented as a deadline.
const MAX_TOKEN_LIFE: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

/// A valid hash of no password anyone knows: unknown logins are checked
/// against it, so they take as long as wrong passcodes.
const DECOY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c3RvbXBnYXRlZGVjb3k$oTMyChV+8F4xqyG1ZzUx0VbGHsmEIQyQAnzS9u5h0S0";

impl Auth {
    /// Checks every configured hash up front, so a typo fails at start.
    pub fn new(config: &AuthConfig, default_exchange: &str) -> Result<Auth, String> {
        let mut users = HashMap::new();
        for user in &config.users {
            PasswordHash::new(&user.password_hash).map_err(|e| {
                format!(
                    "auth.users: user {:?}: password_hash is not a PHC string from \
                     `stompgate hash-password`: {e}",
                    user.name
                )
            })?;
            let grants = Grants::new(default_exchange, &user.subscribe, &user.publish);
            let user_entry = User {
                hash: user.password_hash.clone(),
                grants: Arc::new(grants),
            };
            if users.insert(user.name.clone(), user_entry).is_some() {
                return Err(format!("auth.users: user {:?} is listed twice", user.name));
            }
        }
        if config.mode == AuthMode::Users && users.is_empty() {
            return Err("auth.mode is \"users\" but auth.users lists nobody".into());
        }
        let jwt = match config.mode {
            AuthMode::Jwt => Some(jwt_validation(&config.jwt)?),
            _ => None,
        };
        Ok(Auth {
            mode: config.mode,
            users,
            open: Arc::new(Grants::everything(default_exchange)),
            jwt,
            nbf_leeway: config.jwt.nbf_leeway,
            default_exchange: default_exchange.to_owned(),
            passwords: passwords::Checker::new(
                config.max_concurrent_logins,
                config.max_pending_logins,
                config.failed_login_limit,
                config.failed_login_window,
                // One host usually holds a whole /64.
                64,
            ),
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Who CONNECT (and the upgrade request's token, if any) says the
    /// client is, and what it may do.
    pub async fn authenticate(
        &self,
        login: Option<&str>,
        passcode: Option<&str>,
        upgrade_token: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Identity, AuthError> {
        match self.mode {
            AuthMode::None => Ok(Identity {
                user: login.map(str::to_owned),
                grants: self.open.clone(),
                expires: None,
            }),
            AuthMode::Users => {
                let grants = self.check_password(login, passcode, peer).await?;
                Ok(Identity {
                    user: login.map(str::to_owned),
                    grants,
                    expires: None,
                })
            }
            AuthMode::Jwt => {
                let token = passcode.filter(|p| !p.is_empty()).or(upgrade_token);
                self.check_token(token.ok_or(AuthError::Refused)?)
            }
        }
    }

    fn check_token(&self, token: &str) -> Result<Identity, AuthError> {
        let (key, validation) = self.jwt.as_ref().ok_or(AuthError::Refused)?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| {
                tracing::debug!(error = %e, "token refused");
                AuthError::Refused
            })?
            .claims;
        let now = std::time::SystemTime::now();
        let since_epoch = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if let Some(nbf) = claims.nbf {
            if std::time::Duration::from_secs(nbf) > since_epoch + self.nbf_leeway {
                tracing::debug!(nbf, "token refused: not valid yet");
                return Err(AuthError::Refused);
            }
        }
        // An exp past any real token's life (u64::MAX, say) is refused
        // rather than turned into a time that cannot be represented.
        let expires = std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::from_secs(claims.exp))
            .filter(|at| at.duration_since(now).unwrap_or_default() < MAX_TOKEN_LIFE)
            .ok_or_else(|| {
                tracing::debug!(exp = claims.exp, "token refused: absurd exp");
                AuthError::Refused
            })?;
        let grants = Grants::new(
            &self.default_exchange,
            &claims.stomp.subscribe,
            &claims.stomp.publish,
        );
        Ok(Identity {
            user: claims.sub,
            grants: Arc::new(grants),
            expires: Some(expires),
        })
    }

    /// Password hashing is slow on purpose: bounded, off the async
    /// workers, throttled per address and user (see [`passwords`]).
    async fn check_password(
        &self,
        login: Option<&str>,
        passcode: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Arc<Grants>, AuthError> {
        let user = login.and_then(|l| self.users.get(l));
        let hash = user.map_or(DECOY_HASH, |u| u.hash.as_str());
        let verified = self
            .passwords
            .check(
                hash,
                passcode.unwrap_or_default(),
                peer,
                login.unwrap_or_default(),
            )
            .await?;
        match user {
            Some(user) if verified => Ok(user.grants.clone()),
            _ => Err(AuthError::Refused),
        }
    }
}

/// The key and rules a token is checked with; `exp` is always required
/// and checked without leeway.
fn jwt_validation(config: &JwtConfig) -> Result<(DecodingKey, Validation), String> {
    let read_key = || {
        std::fs::read(&config.public_key_file)
            .map_err(|e| format!("auth.jwt.public_key_file {:?}: {e}", config.public_key_file))
    };
    let (algorithm, key) = match config.algorithm.as_str() {
        "HS256" if config.secret.is_empty() => {
            return Err("auth.jwt.secret is empty; HS256 needs a shared secret".into())
        }
        "HS256" => (
            Algorithm::HS256,
            DecodingKey::from_secret(config.secret.as_bytes()),
        ),
        "RS256" => (
            Algorithm::RS256,
            DecodingKey::from_rsa_pem(&read_key()?)
                .map_err(|e| format!("auth.jwt.public_key_file: not an RSA public key: {e}"))?,
        ),
        "ES256" => (
            Algorithm::ES256,
            DecodingKey::from_ec_pem(&read_key()?)
                .map_err(|e| format!("auth.jwt.public_key_file: not an EC public key: {e}"))?,
        ),
        other => {
            return Err(format!(
                "auth.jwt.algorithm {other:?}: use HS256, RS256 or ES256"
            ))
        }
    };
    let mut validation = Validation::new(algorithm);
    validation.leeway = 0;
    // nbf is checked by check_token, with its own leeway.
    validation.validate_nbf = false;
    // A configured issuer or audience must be there, not only right when
    // it is.
    let mut required = vec!["exp"];
    if !config.issuer.is_empty() {
        required.push("iss");
    }
    if !config.audience.is_empty() {
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    if !config.issuer.is_empty() {
        validation.set_issuer(&[&config.issuer]);
    }
    if config.audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&[&config.audience]);
    }
    Ok((key, validation))
}

/// `stompgate hash-password`: a PHC string for `auth.users`.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(key: &str) -> Route {
        Route {
            exchange: "amq.topic".into(),
            key: key.into(),
        }
    }

    #[test]
    fn grants_cover_only_what_they_allow() {
        let g = Grants::new(
            "amq.topic",
            &["news.*".into(), "no01".into(), "amq.direct/orders.#".into()],
            &["no01".into()],
        );
        assert!(g.may_subscribe(&route("no01")));
        assert!(g.may_subscribe(&route("news.sport")));
        assert!(g.may_subscribe(&route("news.*")));
        assert!(
            !g.may_subscribe(&route("news.#")),
            "news.* does not cover news.#"
        );
        assert!(!g.may_subscribe(&route("#")), "news.* does not cover #");
        assert!(!g.may_subscribe(&route("*")));
        assert!(!g.may_subscribe(&route("no02")));
        assert!(g.may_publish(&route("no01")));
        assert!(
            !g.may_publish(&route("news.sport")),
            "readers may not publish"
        );
        let direct = |key: &str| Route {
            exchange: "amq.direct".into(),
            key: key.into(),
        };
        assert!(g.may_subscribe(&direct("orders.eu.new")));
        assert!(
            !g.may_subscribe(&route("orders.eu")),
            "granted on amq.direct only"
        );
        let all = Grants::everything("amq.topic");
        assert!(all.may_subscribe(&route("#")));
        assert!(all.may_publish(&direct("x")));
        let hash_only = Grants::new("amq.topic", &["#".into()], &[]);
        assert!(
            !hash_only.may_subscribe(&direct("x")),
            "# grants the default exchange"
        );
    }

    #[test]
    fn decoy_hash_is_valid() {
        assert!(PasswordHash::new(DECOY_HASH).is_ok());
    }
}
