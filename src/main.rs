//! The `stompgate` binary: CLI, logging, configuration, bind, run until
//! SIGTERM or Ctrl-C.

use std::fmt;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use stompgate::broker::amqp::AmqpBroker;
use stompgate::config::Config;
use stompgate::metrics::Metrics;
use stompgate::server;

/// STOMP 1.2 over WebSocket in front of RabbitMQ.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file overriding config/default.toml; STOMPGATE__* environment
    /// variables override both.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Read a password (one line) from standard input and print its argon2
    /// hash, for `password_hash` in `[[auth.users]]`.
    HashPassword,
}

/// A reason not to start. `main` returns it, and Rust prints it with
/// `Debug`: that shows the message rather than a struct dump.
struct Fatal(String);

impl fmt::Debug for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Fatal {
    fn from(e: E) -> Fatal {
        Fatal(e.to_string())
    }
}

/// Log filter when RUST_LOG is not set.
const DEFAULT_LOG_FILTER: &str = "info";

fn main() -> Result<(), Fatal> {
    let cli = Cli::parse();
    if let Some(Command::HashPassword) = cli.command {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| Fatal(format!("reading the password from standard input: {e}")))?;
        let password = line.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(Fatal("no password on standard input".into()));
        }
        println!(
            "{}",
            stompgate::auth::hash_password(password).map_err(Fatal)?
        );
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
        )
        // A log line that cannot be written is dropped: by default the
        // subscriber reports it on stderr, and with stderr gone too that
        // report panicked (exit status 101 on SIGTERM).
        .log_internal_errors(false)
        // Colour only for a person at a terminal: log files and pipes get
        // plain text, and NO_COLOR (no-color.org) turns it off anywhere.
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let config = Config::load(cli.config.as_deref())?;
    let open_files = raise_open_file_limit();
    give_large_blocks_back();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        runtime.worker_threads(config.server.worker_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .map_err(|e| Fatal(format!("cannot start the async runtime: {e}")))?;
    tracing::info!(open_files, "open-file limit");
    runtime.block_on(serve(config))
}

/// Every client is a socket: the soft open-file limit (often 1024) is
/// raised to the hard one, as far as the system allows.
fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// glibc's malloc raises its mmap threshold to the largest block freed
/// (up to 32 MiB): after one burst of large messages the next ones come
/// from heaps it seldom gives back (the report: 564 MB still held after
/// ten stuck clients of 4 MB messages had gone). A fixed threshold keeps
/// blocks of 256 KiB and more in their own mappings, returned when freed.
fn give_large_blocks_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

async fn serve(config: Config) -> Result<(), Fatal> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| Fatal(format!("cannot listen on {}: {e}", config.server.listen)))?;
    let metrics = Arc::new(Metrics::new()?);
    let broker = AmqpBroker::new(&config.amqp, &config.server.node_id, metrics.clone())?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    server::run(listener, Arc::new(config), broker, metrics, shutdown).await;
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; Ctrl-C still stops");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    // Cancel first: the log line after it may fail or block on a pipe whose
    // reader is gone, and must not keep the gateway from stopping.
    shutdown.cancel();
    tracing::info!("signal received: shutting down");
}
