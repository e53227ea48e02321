//! The loop's timers as one deadline: of everything that falls due at a
//! time (heart-beats both ways, a frame's timeout, the token's expiry,
//! a publish's confirm, held acks, the publish-rate pause, the next
//! reconnection attempt), the loop sleeps until the earliest, and is told
//! which it was. One timer per turn instead of one per kind.

use tokio::time::{sleep_until, Instant};

/// What falls due, in the order that settles ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Due {
    /// The publish-rate pause is over: read the client again.
    Throttle,
    /// A frame (or WebSocket message) took `stomp.frame_timeout`.
    Frame,
    /// The token's `exp`.
    Expiry,
    /// Try to open the session's queue again.
    Reconnect,
    /// The oldest SEND took `amqp.publish_timeout` without a confirm.
    Publish,
    /// Acks held back for `ACK_DELAY` go.
    ReleaseAcks,
    /// Time to send a heart-beat.
    Heartbeat,
    /// Nothing from the client for twice its heart-beat period.
    Silence,
}

/// The earliest of the deadlines considered.
#[derive(Default)]
pub(super) struct Deadlines {
    next: Option<(Instant, Due)>,
}

impl Deadlines {
    /// Counts `due` at `at`, when there is such a deadline.
    pub(super) fn consider(&mut self, due: Due, at: Option<Instant>) {
        let Some(at) = at else {
            return;
        };
        if self.next.is_none_or(|next| (at, due) < next) {
            self.next = Some((at, due));
        }
    }

    pub(super) fn next(&self) -> Option<(Instant, Due)> {
        self.next
    }

    /// Resolves with what fell due, at the earliest deadline; never
    /// without one. Cancel-safe.
    pub(super) async fn elapsed(&self) -> Due {
        match self.next() {
            Some((at, due)) => {
                sleep_until(at).await;
                due
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_earliest_deadline_wins_and_ties_go_by_kind() {
        let now = Instant::now();
        let mut deadlines = Deadlines::default();
        assert_eq!(deadlines.next(), None);
        deadlines.consider(Due::Heartbeat, Some(now + Duration::from_secs(10)));
        deadlines.consider(Due::Frame, None);
        deadlines.consider(Due::Silence, Some(now + Duration::from_secs(3)));
        assert_eq!(
            deadlines.next(),
            Some((now + Duration::from_secs(3), Due::Silence))
        );
        deadlines.consider(Due::Publish, Some(now + Duration::from_secs(3)));
        assert_eq!(
            deadlines.next(),
            Some((now + Duration::from_secs(3), Due::Publish))
        );
        deadlines.consider(Due::Throttle, Some(now + Duration::from_secs(4)));
        deadlines.consider(Due::Frame, Some(now));
        assert_eq!(deadlines.next(), Some((now, Due::Frame)));
    }

    #[tokio::test(start_paused = true)]
    async fn it_wakes_at_the_earliest_with_what_fell_due() {
        let start = Instant::now();
        let mut deadlines = Deadlines::default();
        deadlines.consider(Due::Expiry, Some(start + Duration::from_secs(60)));
        deadlines.consider(Due::ReleaseAcks, Some(start + Duration::from_millis(100)));
        assert_eq!(deadlines.elapsed().await, Due::ReleaseAcks);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // Without a deadline, it never resolves.
        let never = Deadlines::default();
        let waited = tokio::time::timeout(Duration::from_secs(3600), never.elapsed()).await;
        assert!(waited.is_err());
    }
}
