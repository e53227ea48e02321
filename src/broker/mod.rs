//! The port between a STOMP session and the message broker.
//!
//! A session sees only these traits: open a [`BrokerSession`] (one private
//! queue), bind and unbind routes on it, publish with confirms, take
//! deliveries and settle them. [`amqp`] is the RabbitMQ implementation;
//! RabbitMQ does all routing and fan-out, so nothing here knows about other
//! sessions.

pub mod amqp;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::destination::Route;

/// A message taken from the session's queue, to be acked or nacked by `tag`
/// unless it came `settled`.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub tag: u64,
    /// Taken without acknowledgement (see [`BrokerSession::require_acks`]):
    /// the broker counts it consumed, and nothing acks or nacks it.
    pub settled: bool,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    /// STOMP headers made from the message's AMQP properties and headers.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// A message to publish. `headers` are the client's SEND headers; the
/// adapter decides which are properties, which travel as message headers
/// and which are STOMP's own and stay behind.
#[derive(Debug, Clone)]
pub struct Publish {
    pub route: Route,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Who sent it, set by the gateway (never by the client): goes with
    /// the message as `stompgate-sender-session` and `stompgate-sender-user`.
    pub sender: Option<Arc<Sender>>,
}

/// The STOMP session a message came from, and its authenticated user.
#[derive(Debug)]
pub struct Sender {
    pub session: String,
    pub user: Option<String>,
}

/// The broker's confirm of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// At least one queue took the message.
    Routed,
    /// No queue was bound for its routing key; the broker returned it.
    Unroutable,
    /// The broker refused responsibility for it (`basic.nack`): e.g. a
    /// full queue with `x-overflow` `reject-publish`. An answer about
    /// this one message, not a fault of the session.
    Nacked,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// No connection to the broker, or it was lost.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused an operation (unknown exchange, access refused…).
    #[error("broker refused: {0}")]
    Refused(String),
    /// The client's message cannot be expressed in AMQP.
    #[error("{0}")]
    Invalid(String),
    /// The session's client fell so far behind that its deliveries would
    /// take the gateway past `limit` (a config key): the session is over.
    #[error("{detail}")]
    Overrun { limit: &'static str, detail: String },
}

/// What the broker link can do for new sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// No connection was tried yet (the gateway just started).
    Starting,
    /// The last attempt failed, every connection was lost, or the broker
    /// blocks publishing; the text says which, for operators.
    Unavailable(String),
}

/// A connection to the broker shared by all sessions of this process.
pub trait Broker: Clone + Send + Sync + 'static {
    type Session: BrokerSession;

    /// Creates the session's exclusive queue (named after `session_id`)
    /// and starts consuming from it: with acknowledgements and a prefetch
    /// when `acks`, else without (see [`BrokerSession::require_acks`]).
    fn open(
        &self,
        session_id: &str,
        acks: bool,
    ) -> impl Future<Output = Result<Self::Session, BrokerError>> + Send;

    /// Whether new sessions can be served now (`/readyz`, WebSocket
    /// upgrades): state kept by the connections, read without I/O, so it
    /// answers at once even while the broker hangs.
    fn readiness(&self) -> Readiness;

    /// Tries to hold a connection, so that readiness is fresh even when
    /// no session uses the broker; bounded by `amqp.connect_timeout`.
    fn probe(&self) -> impl Future<Output = ()> + Send;
}

/// One STOMP session's private queue and the channel that serves it.
pub trait BrokerSession: Send + 'static {
    /// Resolves when the broker confirms a publish.
    type Confirm: Future<Output = Result<Confirmed, BrokerError>> + Send + Unpin + 'static;

    fn queue_name(&self) -> &str;

    fn bind(&mut self, route: &Route) -> impl Future<Output = Result<(), BrokerError>> + Send;

    fn unbind(&mut self, route: &Route) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Sends the message and returns the pending confirm. The message is
    /// published `mandatory`: the confirm says whether any queue took it.
    fn publish(
        &mut self,
        message: &Publish,
    ) -> impl Future<Output = Result<Self::Confirm, BrokerError>> + Send;

    /// The next delivery; `None` once the consumer has ended.
    /// Cancel-safe: dropping the future loses no delivery.
    fn next_delivery(
        &mut self,
    ) -> impl Future<Output = Option<Result<Delivery, BrokerError>>> + Send;

    /// Whether deliveries come with acknowledgements (and so at most a
    /// prefetch of them at a time), rather than `settled`.
    fn acks(&self) -> bool;

    /// Whether, without acknowledgements, deliveries came in faster than
    /// they were taken: at least a prefetch's worth was waiting at once.
    fn behind(&self) -> bool;

    /// Resolves when the broker side gave the session up because the node
    /// holds too much for slow clients ([`BrokerError::Overrun`] with the
    /// node's limit): the session ends at once, whatever it is waiting for.
    fn cut_off(&self) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }

    /// Consumes with acknowledgements from now on, so that the broker holds
    /// what the session has not taken, at most a prefetch in the gateway.
    /// Unacknowledged consumption is the fast path (no ack for the broker
    /// to process), for sessions that keep up. Returns, in order, the
    /// deliveries that came without acknowledgement and were not yet taken.
    fn require_acks(&mut self) -> impl Future<Output = Result<Vec<Delivery>, BrokerError>> + Send;

    /// Acknowledges delivery `tag`, or with `multiple` every delivery up
    /// to and including it (one frame for a batch). Never for a `settled`
    /// delivery, nor `nack`: the broker knows no such tag.
    fn ack(
        &mut self,
        tag: u64,
        multiple: bool,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    fn nack(
        &mut self,
        tag: u64,
        requeue: bool,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Whether a publish can be handed to the broker now. False while the
    /// broker reads nothing (it blocks the connection, or paused the
    /// channel's flow) and what was handed to it already is at its bound:
    /// the session then stops reading its client instead of buffering.
    fn writable(&self) -> bool;

    /// Resolves once [`BrokerSession::writable`]. Cancel-safe; borrows
    /// nothing, so the session waits for it beside its other events.
    fn until_writable(&self) -> impl Future<Output = ()> + Send + 'static;

    /// Deletes the queue and closes the channel; never fails, as the
    /// session is ending anyway (an exclusive, auto-delete queue goes with
    /// its consumer even when the broker cannot be told).
    fn close(self) -> impl Future<Output = ()> + Send;
}
