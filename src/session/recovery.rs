//! Losing the broker without losing the session: the client is kept,
//! the queue is opened again with backoff while the loop goes on, then
//! its bindings are restored, unconfirmed SENDs published again in order,
//! and each subscription's next MESSAGE marked with the gap header.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::broker::{Broker, BrokerError, BrokerSession};
use crate::config::AmqpConfig;

use super::{Session, SessionError};

/// A broker session being opened, boxed so the loop can keep it across
/// turns.
pub(super) type Opening<S> = Pin<Box<dyn Future<Output = Result<S, BrokerError>> + Send>>;

/// The outcome of the reconnection attempt under way, or never when none
/// is. Cancel-safe: the attempt stays in `opening` until it resolves.
pub(super) async fn opened<S>(opening: &mut Option<Opening<S>>) -> Result<S, BrokerError> {
    match opening {
        Some(opening) => opening.as_mut().await,
        None => std::future::pending().await,
    }
}

/// How long to wait after `failures` attempts in a row failed: from
/// `amqp.reconnect_min`, doubling, up to `amqp.reconnect_max`.
fn backoff(failures: u32, amqp: &AmqpConfig) -> Duration {
    let doubling = 2u32.saturating_pow(failures.min(16));
    amqp.reconnect_min
        .checked_mul(doubling)
        .map_or(amqp.reconnect_max, |d| d.min(amqp.reconnect_max))
}

impl<B: Broker> Session<B> {
    /// Passes a broker result on, except that losing the broker is not the
    /// client's problem: the session keeps going and reconnects.
    pub(super) async fn check<T>(
        &mut self,
        result: Result<T, BrokerError>,
    ) -> Result<Option<T>, SessionError> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(BrokerError::Unavailable(why)) => {
                self.lose_broker(&why).await;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The broker connection is gone: drop the session's side of it and
    /// start reconnecting. What was delivered but not yet acked went with
    /// the queue; unconfirmed SENDs will be published again.
    pub(super) async fn lose_broker(&mut self, why: &str) {
        let Some(broker) = self.broker.take() else {
            return;
        };
        warn!(
            error = why,
            "broker lost: keeping the session and reconnecting"
        );
        // In the background: a broker that hangs must not hold the loop.
        tokio::spawn(broker.close());
        self.in_flight.lost();
        self.acks.lost();
        self.subscriptions.mark_gap();
        self.reconnect_failures = 0;
        self.reconnect_at = Instant::now();
    }

    /// An attempt to open the session's queue again came back: restore
    /// its bindings and consumer, then the unconfirmed SENDs in order; or
    /// plan the next attempt.
    pub(super) async fn reconnected(
        &mut self,
        opened: Result<B::Session, BrokerError>,
    ) -> Result<(), SessionError> {
        let mut broker = match opened {
            Ok(broker) => broker,
            Err(BrokerError::Unavailable(why)) => {
                self.reconnect_failures = self.reconnect_failures.saturating_add(1);
                let delay = backoff(self.reconnect_failures, &self.config.amqp);
                debug!(error = why, ?delay, "broker still unavailable");
                self.reconnect_at = Instant::now() + delay;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let restored = async {
            for route in self.subscriptions.routes() {
                broker.bind(route).await?;
            }
            let now = Instant::now();
            for again in self.in_flight.publish_again() {
                *again.confirm = Some(broker.publish(again.message).await?);
                *again.published = now;
            }
            Ok::<_, BrokerError>(())
        }
        .await;
        match restored {
            Ok(()) => {
                info!(
                    republished = self.in_flight.sends(),
                    "broker back: session restored"
                );
                self.metrics.sessions_recovered.inc();
                self.conn.cut = Some(Box::pin(broker.cut_off()));
                self.broker = Some(broker);
                Ok(())
            }
            Err(e) => {
                tokio::spawn(broker.close());
                self.in_flight.lost();
                let retry = matches!(e, BrokerError::Unavailable(_));
                if retry {
                    self.reconnect_at = Instant::now() + self.config.amqp.reconnect_min;
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_back_off_doubling_up_to_the_ceiling() {
        let mut amqp = crate::config::Config::defaults().unwrap().amqp;
        amqp.reconnect_min = Duration::from_millis(100);
        amqp.reconnect_max = Duration::from_secs(5);
        let delays: Vec<_> = [1, 2, 5, 6, 40, u32::MAX]
            .into_iter()
            .map(|failures| backoff(failures, &amqp).as_millis())
            .collect();
        assert_eq!(delays, [200, 400, 3200, 5000, 5000, 5000]);
        // A minimum so large that doubling overflows still gives the
        // ceiling.
        amqp.reconnect_min = Duration::MAX;
        assert_eq!(backoff(3, &amqp), amqp.reconnect_max);
    }
}
