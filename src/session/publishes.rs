//! What the client sends on: SENDs in flight until RabbitMQ confirms
//! them, receipts in frame order (`routed:` from the confirm), and
//! transactions holding checked frames until COMMIT. [`InFlights`] and
//! [`Transactions`] are bookkeeping; the session's methods below publish,
//! settle and answer.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{timeout, Instant};
use tracing::warn;

use crate::broker::{Broker, BrokerError, BrokerSession, Confirmed, Publish};
use crate::budget::{Account, Budget};
use crate::config::StompConfig;
use crate::destination::{Addressed, Destination, Use};
use crate::stomp::command;
use crate::stomp::frame::Frame;

use super::{denied_by_grants, End, Session, SessionError};

/// A SEND on its way to the broker, or the receipt of another frame
/// waiting its turn. Kept in frame order until settled, so receipts go out
/// in order, each after its own publish is confirmed; a SEND keeps its
/// message, so what the broker had not confirmed when it was lost can be
/// published again once it is back.
struct InFlight<C> {
    receipt: Option<String>,
    /// None for the receipt of a frame other than SEND.
    message: Option<Publish>,
    /// The broker's pending confirm; None while the message waits for the
    /// broker to come back, or once it resolved.
    confirm: Option<C>,
    /// When the client sent it: `amqp.publish_timeout` counts from here.
    since: Instant,
    /// When it was (last) published: the confirm latency counts from here.
    published: Instant,
}

impl<C> InFlight<C> {
    /// Whether this entry can settle now (a receipt marker, or a publish
    /// with a confirm to wait for), as opposed to waiting for the broker.
    fn settleable(&self) -> bool {
        self.message.is_none() || self.confirm.is_some()
    }
}

/// The oldest entry, settled.
pub(super) struct Settled {
    pub(super) receipt: Option<String>,
    pub(super) published: Instant,
}

/// SENDs and receipts in frame order, `C` being the broker's confirm.
pub(super) struct InFlights<C> {
    queue: VecDeque<InFlight<C>>,
}

impl<C> InFlights<C>
where
    C: Future<Output = Result<Confirmed, BrokerError>> + Unpin,
{
    pub(super) fn new() -> InFlights<C> {
        InFlights {
            queue: VecDeque::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The receipt of a frame other than SEND, behind any unsettled SENDs.
    pub(super) fn push_receipt(&mut self, receipt: &str, now: Instant) {
        self.queue.push_back(InFlight {
            receipt: Some(receipt.to_owned()),
            message: None,
            confirm: None,
            since: now,
            published: now,
        });
    }

    /// A SEND, published (`confirm`) or waiting for the broker (None).
    pub(super) fn push_publish(
        &mut self,
        message: Publish,
        receipt: Option<&str>,
        confirm: Option<C>,
        now: Instant,
    ) {
        self.queue.push_back(InFlight {
            receipt: receipt.map(str::to_owned),
            message: Some(message),
            confirm,
            since: now,
            published: now,
        });
    }

    /// Whether the oldest entry can settle now.
    pub(super) fn front_settleable(&self) -> bool {
        self.queue.front().is_some_and(InFlight::settleable)
    }

    /// When the oldest SEND was sent (`amqp.publish_timeout` runs from it).
    pub(super) fn oldest_send(&self) -> Option<Instant> {
        self.queue
            .front()
            .filter(|f| f.message.is_some())
            .map(|f| f.since)
    }

    /// The oldest entry's receipt.
    pub(super) fn front_receipt(&self) -> Option<String> {
        self.queue.front().and_then(|f| f.receipt.clone())
    }

    /// The oldest entry's confirm outcome (None for a receipt marker).
    /// Cancel-safe: the confirm stays in the queue until it resolves, and
    /// is taken out of it when it does.
    pub(super) async fn settle_front(&mut self) -> Result<Option<Confirmed>, BrokerError> {
        std::future::poll_fn(|cx| {
            let Some(front) = self.queue.front_mut() else {
                return Poll::Ready(Ok(None));
            };
            let Some(confirm) = front.confirm.as_mut() else {
                return Poll::Ready(Ok(None));
            };
            let result = std::task::ready!(Pin::new(confirm).poll(cx));
            front.confirm = None;
            Poll::Ready(result.map(Some))
        })
        .await
    }

    pub(super) fn pop_front(&mut self) -> Option<Settled> {
        self.queue.pop_front().map(|f| Settled {
            receipt: f.receipt,
            published: f.published,
        })
    }

    /// The broker was lost: its confirms will never come; the SENDs wait
    /// to be published again.
    pub(super) fn lost(&mut self) {
        for flight in &mut self.queue {
            flight.confirm = None;
        }
    }

    /// The SENDs to publish again, in order, each with where its new
    /// confirm goes.
    pub(super) fn publish_again(&mut self) -> impl Iterator<Item = Republish<'_, C>> {
        self.queue.iter_mut().filter_map(|flight| {
            let message = flight.message.as_ref()?;
            Some(Republish {
                message,
                confirm: &mut flight.confirm,
                published: &mut flight.published,
            })
        })
    }

    /// How many SENDs wait for their confirm.
    pub(super) fn sends(&self) -> usize {
        self.queue.iter().filter(|f| f.message.is_some()).count()
    }

    /// The receipts of SENDs whose outcome is not known yet.
    pub(super) fn unanswered(&self) -> Vec<&str> {
        self.queue
            .iter()
            .filter(|f| f.message.is_some())
            .filter_map(|f| f.receipt.as_deref())
            .collect()
    }
}

/// A SEND waiting to be published again after a reconnect.
pub(super) struct Republish<'a, C> {
    pub(super) message: &'a Publish,
    pub(super) confirm: &'a mut Option<C>,
    pub(super) published: &'a mut Instant,
}

/// A SEND, ACK or NACK held back until its transaction commits. A SEND
/// is held checked (destination, exchange, grants), so that COMMIT
/// publishes all or, for a SEND that could never be, nothing.
pub(super) enum Deferred {
    Send(Publish),
    Ack(String),
    Nack(String),
}

struct Transaction {
    frames: Vec<Deferred>,
    bytes: usize,
    /// `bytes`, charged to stomp.node_inbound_bytes.
    account: Account,
}

/// The session's open transactions, bounded by `stomp.max_transactions`,
/// `stomp.max_transaction_frames`, `stomp.max_transaction_bytes` and,
/// all sessions together, `stomp.node_inbound_bytes`.
pub(super) struct Transactions {
    open: HashMap<String, Transaction>,
    inbound: Arc<Budget>,
    max_transactions: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl Transactions {
    pub(super) fn new(stomp: &StompConfig, inbound: Arc<Budget>) -> Transactions {
        Transactions {
            open: HashMap::new(),
            inbound,
            max_transactions: stomp.max_transactions,
            max_frames: stomp.max_transaction_frames,
            max_bytes: stomp.max_transaction_bytes,
        }
    }

    pub(super) fn begin(&mut self, name: String) -> Result<(), SessionError> {
        if self.open.contains_key(&name) {
            return Err(SessionError::Protocol(format!(
                "transaction {name:?} has already begun"
            )));
        }
        let limit = self.max_transactions;
        if self.open.len() >= limit {
            return Err(SessionError::Limit {
                key: "stomp.max_transactions",
                detail: format!("more than stomp.max_transactions ({limit}) open transactions"),
            });
        }
        let tx = Transaction {
            frames: Vec::new(),
            bytes: 0,
            account: self.inbound.account(),
        };
        self.open.insert(name, tx);
        Ok(())
    }

    /// Holds `deferred` in transaction `name` until it ends.
    pub(super) fn defer(&mut self, name: &str, deferred: Deferred) -> Result<(), SessionError> {
        let Some(tx) = self.open.get_mut(name) else {
            return Err(no_transaction(name));
        };
        if tx.frames.len() >= self.max_frames {
            return Err(SessionError::Limit {
                key: "stomp.max_transaction_frames",
                detail: format!(
                    "transaction {name:?} holds more than stomp.max_transaction_frames ({}) frames",
                    self.max_frames
                ),
            });
        }
        if let Deferred::Send(message) = &deferred {
            // Headers cost memory as bodies do.
            let headers: usize = message
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum();
            tx.bytes += message.body.len() + headers;
            tx.account.set(tx.bytes);
            if tx.account.budget().over() {
                return Err(SessionError::Limit {
                    key: "stomp.node_inbound_bytes",
                    detail: format!(
                        "the node holds more than stomp.node_inbound_bytes ({} bytes) for its \
                         clients: transaction {name:?} can take no more",
                        tx.account.budget().limit()
                    ),
                });
            }
            if tx.bytes > self.max_bytes {
                return Err(SessionError::Limit {
                    key: "stomp.max_transaction_bytes",
                    detail: format!(
                        "transaction {name:?} holds more than stomp.max_transaction_bytes ({} bytes)",
                        self.max_bytes
                    ),
                });
            }
        }
        tx.frames.push(deferred);
        Ok(())
    }

    /// Ends transaction `name`: its frames, to run (COMMIT) or drop (ABORT).
    pub(super) fn end(&mut self, name: &str) -> Result<Vec<Deferred>, SessionError> {
        let tx = self.open.remove(name).ok_or_else(|| no_transaction(name))?;
        Ok(tx.frames)
    }
}

fn no_transaction(name: &str) -> SessionError {
    SessionError::Protocol(format!("no transaction {name:?} has begun"))
}

impl<B: Broker> Session<B> {
    /// A SEND as a message to publish, once its destination is valid and
    /// granted.
    pub(super) fn prepare(&self, send: command::Send) -> Result<Publish, SessionError> {
        let route = match Addressed::parse_send(&send.destination) {
            Some(addressed) => {
                let addressed = addressed?;
                let route = addressed.route(&self.config.amqp.direct_exchange);
                // A user may always write to itself; to anyone else, and
                // to a session, as its publish grants on the direct
                // exchange say (auth.mode = "none" grants everything).
                let to_self = matches!(&addressed, Addressed::User { user, .. }
                    if self.user.as_deref() == Some(user.as_str()));
                if !to_self && !self.grants.may_publish(&route) {
                    return Err(denied_by_grants(Use::Send, &send.destination));
                }
                route
            }
            None => {
                let destination =
                    Destination::parse(&send.destination, Use::Send, &self.config.amqp.exchange)?;
                self.check_exchange(&destination)?;
                if !self.grants.may_publish(&destination.route) {
                    return Err(denied_by_grants(Use::Send, &send.destination));
                }
                destination.route
            }
        };
        Ok(Publish {
            route,
            headers: send.headers,
            body: send.body,
            sender: Some(self.sender.clone()),
        })
    }

    /// Publishes a message (or holds it while the broker is away); its
    /// confirm and receipt join the in-flight queue.
    pub(super) async fn publish(
        &mut self,
        message: Publish,
        receipt: Option<&str>,
    ) -> Result<(), SessionError> {
        self.entry.messages_in.fetch_add(1, Ordering::Relaxed);
        let confirm = match self.broker.as_mut() {
            Some(broker) => {
                let result = broker.publish(&message).await;
                self.check(result).await?
            }
            None => None,
        };
        self.in_flight
            .push_publish(message, receipt, confirm, Instant::now());
        Ok(())
    }

    /// COMMIT: the transaction's frames, in order.
    pub(super) async fn commit(&mut self, name: &str) -> Result<(), SessionError> {
        for deferred in self.transactions.end(name)? {
            match deferred {
                Deferred::Send(message) => self.publish(message, None).await?,
                Deferred::Ack(id) => self.acknowledge(&id, true).await?,
                Deferred::Nack(id) => self.acknowledge(&id, false).await?,
            }
        }
        Ok(())
    }

    pub(super) fn check_exchange(&self, destination: &Destination) -> Result<(), SessionError> {
        let exchange = &destination.route.exchange;
        if self.config.amqp.exchange_allowed(exchange) {
            return Ok(());
        }
        if *exchange == self.config.amqp.direct_exchange {
            return Err(SessionError::Denied {
                rule: "amqp.direct_exchange",
                detail: format!(
                    "exchange {exchange:?} is amqp.direct_exchange, which only the gateway \
                     routes on: use /user/ and /session/ destinations (and /presence/)"
                ),
            });
        }
        Err(SessionError::Denied {
            rule: "amqp.allowed_exchanges",
            detail: format!("exchange {exchange:?} is not in amqp.allowed_exchanges"),
        })
    }

    /// The oldest in-flight entry settled: send its receipt (when
    /// `receipts`), or report why the broker refused, or go reconnecting
    /// if the broker went away.
    pub(super) async fn settled(
        &mut self,
        result: Result<Option<Confirmed>, BrokerError>,
        receipts: bool,
    ) -> Result<(), End> {
        let confirmed = match result {
            Ok(confirmed) => confirmed,
            Err(BrokerError::Unavailable(why)) => {
                self.lose_broker(&why).await;
                return Ok(());
            }
            Err(e) => {
                let receipt = self.in_flight.front_receipt();
                return Err(self.fail(e.into(), receipt.as_deref()).await);
            }
        };
        let Some(flight) = self.in_flight.pop_front() else {
            return Ok(());
        };
        if let Some(confirmed) = confirmed {
            self.count_confirm(confirmed, flight.published.elapsed());
        }
        let Some(receipt) = flight.receipt.filter(|_| receipts) else {
            return Ok(());
        };
        let mut frame = command::receipt(&receipt);
        if let Some(confirmed) = confirmed {
            let routed = confirmed == Confirmed::Routed;
            frame = frame.header("routed", routed.to_string());
            if confirmed == Confirmed::Nacked {
                frame = frame.header("stompgate-nacked", "true");
            }
        }
        self.keep_up().await?;
        self.conn.write(&frame).await
    }

    fn count_confirm(&self, confirmed: Confirmed, took: Duration) {
        match confirmed {
            Confirmed::Nacked => {
                self.metrics.messages_nacked.inc();
                return;
            }
            Confirmed::Unroutable => self.metrics.messages_unroutable.inc(),
            Confirmed::Routed => {}
        }
        self.metrics.messages_published.inc();
        self.metrics
            .publish_confirm_seconds
            .observe(took.as_secs_f64());
    }

    /// Settles what can settle within `limit`: confirms still on their
    /// way (with their receipts when `receipts`). SENDs held for a broker
    /// that is away stay unconfirmed and get no receipt.
    pub(super) async fn drain(&mut self, receipts: bool, limit: Duration) -> Result<(), End> {
        let drained = timeout(limit, async {
            while self.in_flight.front_settleable() {
                let result = self.in_flight.settle_front().await;
                if result.is_err() && !receipts {
                    break;
                }
                self.settled(result, receipts).await?;
            }
            Ok(())
        })
        .await;
        drained.unwrap_or_else(|_| {
            warn!(
                unconfirmed = self.in_flight.len(),
                ?limit,
                "publishes still unconfirmed when the session ended"
            );
            Ok(())
        })
    }

    /// `frame`, an ERROR, with `receipt-id` (the frame's own `receipt`, or
    /// the first unanswered one) and the list of SENDs whose receipts will
    /// never come.
    pub(super) fn with_unanswered(&self, mut frame: Frame, receipt: Option<&str>) -> Frame {
        let unanswered = self.in_flight.unanswered();
        if let Some(id) = receipt.or(unanswered.first().copied()) {
            frame = frame.header("receipt-id", id);
        }
        if unanswered.is_empty() {
            return frame;
        }
        frame = frame
            .header("stompgate-outcome", "unknown")
            .header("stompgate-unanswered", unanswered.len().to_string());
        let mut body = frame.body.to_vec();
        body.extend_from_slice(
            format!(
                "\n\noutcome unknown: the broker may still deliver the SENDs with these receipts, \
                 so sending them again may deliver them twice: {}\n",
                unanswered.join(", ")
            )
            .as_bytes(),
        );
        frame.body(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::Route;
    use prometheus::IntGauge;

    type Confirm = std::future::Ready<Result<Confirmed, BrokerError>>;

    fn message(body: &str) -> Publish {
        Publish {
            route: Route {
                exchange: "amq.topic".into(),
                key: "x".into(),
            },
            headers: vec![("h".into(), "v".into())],
            body: body.as_bytes().to_vec().into(),
            sender: None,
        }
    }

    fn confirmed(outcome: Confirmed) -> Option<Confirm> {
        Some(std::future::ready(Ok(outcome)))
    }

    #[tokio::test]
    async fn receipts_keep_frame_order_across_a_reconnect() {
        let mut flights = InFlights::<Confirm>::new();
        let now = Instant::now();
        flights.push_publish(message("1"), Some("r1"), confirmed(Confirmed::Routed), now);
        flights.push_receipt("sub", now);
        flights.push_publish(message("2"), None, confirmed(Confirmed::Routed), now);
        flights.push_publish(message("3"), Some("r3"), None, now);
        assert_eq!(flights.unanswered(), ["r1", "r3"]);
        assert_eq!(flights.oldest_send(), Some(now));
        // The broker goes: no confirm will come, so nothing can settle,
        // and the receipt behind the first SEND waits with it.
        flights.lost();
        assert!(!flights.front_settleable());
        assert_eq!(flights.sends(), 3);
        // Back: the three SENDs are published again, in order.
        let again: Vec<_> = flights
            .publish_again()
            .map(|r| {
                *r.confirm = confirmed(Confirmed::Unroutable);
                r.message.body.clone()
            })
            .collect();
        assert_eq!(again, ["1".as_bytes(), b"2", b"3"]);
        let mut order = Vec::new();
        while flights.front_settleable() {
            let outcome = flights.settle_front().await.unwrap();
            let settled = flights.pop_front().unwrap();
            order.push((settled.receipt, outcome));
        }
        assert_eq!(
            order,
            [
                (Some("r1".into()), Some(Confirmed::Unroutable)),
                (Some("sub".into()), None),
                (None, Some(Confirmed::Unroutable)),
                (Some("r3".into()), Some(Confirmed::Unroutable)),
            ]
        );
        assert!(flights.is_empty());
    }

    fn transactions(node_bytes: usize) -> Transactions {
        let mut stomp = crate::config::Config::defaults().unwrap().stomp;
        stomp.max_transactions = 2;
        stomp.max_transaction_frames = 3;
        stomp.max_transaction_bytes = 100;
        let gauge = IntGauge::new("held", "held").unwrap();
        Transactions::new(&stomp, Budget::new(node_bytes, gauge))
    }

    fn limit_key(result: Result<(), SessionError>) -> &'static str {
        match result {
            Err(SessionError::Limit { key, .. }) => key,
            other => panic!("not refused by a limit: {other:?}"),
        }
    }

    #[test]
    fn transactions_are_bounded_in_number_frames_and_bytes() {
        let mut txs = transactions(1 << 20);
        txs.begin("a".into()).unwrap();
        assert!(matches!(
            txs.begin("a".into()),
            Err(SessionError::Protocol(_))
        ));
        txs.begin("b".into()).unwrap();
        assert_eq!(limit_key(txs.begin("c".into())), "stomp.max_transactions");
        // Bytes count headers ("h" "v" and two) as well as bodies.
        txs.defer("a", Deferred::Send(message(&"x".repeat(90))))
            .unwrap();
        assert_eq!(
            limit_key(txs.defer("a", Deferred::Send(message("yyyyyy")))),
            "stomp.max_transaction_bytes"
        );
        for id in ["1", "2", "3"] {
            txs.defer("b", Deferred::Ack(id.into())).unwrap();
        }
        assert_eq!(
            limit_key(txs.defer("b", Deferred::Nack("4".into()))),
            "stomp.max_transaction_frames"
        );
        assert!(matches!(
            txs.defer("nope", Deferred::Ack("1".into())),
            Err(SessionError::Protocol(_))
        ));
        assert_eq!(txs.end("b").unwrap().len(), 3);
        assert!(txs.end("b").is_err());
    }

    #[test]
    fn a_transaction_takes_no_more_once_the_node_is_over() {
        let mut txs = transactions(50);
        txs.begin("a".into()).unwrap();
        txs.defer("a", Deferred::Send(message("small"))).unwrap();
        assert_eq!(
            limit_key(txs.defer("a", Deferred::Send(message(&"z".repeat(60))))),
            "stomp.node_inbound_bytes"
        );
        // What it held is given back when it ends.
        let held = txs.inbound.clone();
        assert!(held.held() > 0);
        txs.end("a").unwrap();
        assert_eq!(held.held(), 0);
    }
}
