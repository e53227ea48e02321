//! A TCP fault proxy between a gateway and RabbitMQ, for network faults
//! that `rabbitmqctl` cannot make: it passes bytes both ways until told to
//! black-hole them (every connection held open, nothing forwarded, no RST:
//! a cable pulled or a frozen peer), to delay them, or to reset every
//! connection it carries (RST to both ends, as a firewall or a NAT that
//! lost its state would).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Nothing is forwarded, and new connections are accepted but not
    /// carried on to the broker; what was sent waits, nothing is refused.
    Blackhole,
    /// Every chunk waits this long before it is forwarded.
    Delay(Duration),
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Bumped to reset every connection open at that moment.
    resets: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and carries each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (fault, _) = watch::channel(Fault::Pass);
        let (resets, _) = watch::channel(0);
        let (faults, generations) = (fault.clone(), resets.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(carry(
                    client,
                    upstream,
                    faults.subscribe(),
                    generations.subscribe(),
                ));
            }
        });
        FaultProxy {
            addr,
            fault,
            resets,
            accept,
        }
    }

    /// An AMQP URL through the proxy to the local broker (guest, vhost /),
    /// with `query` (e.g. `?heartbeat=2`).
    pub fn amqp_url(&self, query: &str) -> String {
        format!("amqp://guest:guest@{}/%2f{query}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Resets every connection open now: both ends get an RST.
    pub fn reset_all(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

async fn carry(
    client: TcpStream,
    upstream: SocketAddr,
    mut fault: watch::Receiver<Fault>,
    mut resets: watch::Receiver<u64>,
) {
    resets.borrow_and_update();
    // A black hole swallows the connection attempt too.
    while *fault.borrow_and_update() == Fault::Blackhole {
        if fault.changed().await.is_err() {
            return;
        }
    }
    let Ok(broker) = TcpStream::connect(upstream).await else {
        return;
    };
    for socket in [&client, &broker] {
        let _ = socket.set_nodelay(true);
        // Closing sends RST rather than FIN: a reset, not a goodbye.
        let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
    }
    let (client_read, client_write) = client.into_split();
    let (broker_read, broker_write) = broker.into_split();
    let up = tokio::spawn(pump(
        client_read,
        broker_write,
        fault.clone(),
        resets.clone(),
    ));
    let down = tokio::spawn(pump(broker_read, client_write, fault, resets));
    let _ = tokio::join!(up, down);
}

/// Forwards one direction until either side ends or a reset is ordered.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    mut resets: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let step = async {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            loop {
                let now = *fault.borrow_and_update();
                match now {
                    Fault::Pass => break,
                    Fault::Delay(delay) => {
                        tokio::time::sleep(delay).await;
                        break;
                    }
                    // Held, not dropped, until the hole closes.
                    Fault::Blackhole => {
                        if fault.changed().await.is_err() {
                            return false;
                        }
                    }
                }
            }
            to.write_all(&buf[..n]).await.is_ok()
        };
        let go_on = tokio::select! {
            go_on = step => go_on,
            _ = resets.changed() => {
                // Without a FIN: dropping the read half closes the socket,
                // and the zero linger makes that an RST.
                to.forget();
                return;
            }
        };
        if !go_on {
            return;
        }
    }
}
