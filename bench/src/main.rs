//! stompgate-bench: a load generator for STOMP-over-WebSocket gateways
//! (stompgate, RabbitMQ's Web-STOMP) and the same fan-out straight over
//! AMQP. Every run ends with one JSON line on stdout; `scripts/bench` runs
//! the side-by-side comparison and writes BENCHMARKS.md from those lines.

mod amqp;
mod conns;
mod fanout;
mod presence;
mod procs;
mod stomp;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "stompgate-bench", version, about)]
struct Cli {
    /// Name of the system under test, copied into the JSON line.
    #[arg(long, global = true, default_value = "")]
    label: String,
    /// Server processes whose CPU time and memory to report, as NAME=PID
    /// (repeat: e.g. --watch gateway=1234 --watch broker=5678).
    #[arg(long = "watch", global = true)]
    watch: Vec<procs::Watched>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// S subscribers on C channels, P publishers, over STOMP/WebSocket.
    Fanout {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        shape: fanout::Shape,
    },
    /// N idle connections with one subscription each.
    Conns {
        #[command(flatten)]
        target: Target,
        /// Broker for the final check message (every connection must get it).
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        amqp_url: String,
        #[command(flatten)]
        args: conns::Conns,
    },
    /// Members joining and leaving a key, watched or not: presence's cost.
    Presence {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        shape: presence::Shape,
    },
    /// The fan-out straight over AMQP: the broker's ceiling.
    AmqpFanout {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        amqp_url: String,
        /// AMQP connections the subscribers' channels are spread over.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[command(flatten)]
        shape: fanout::Shape,
    },
}

#[derive(Clone, Debug, clap::Args)]
struct Target {
    /// WebSocket URL: ws://127.0.0.1:8080/ws for stompgate,
    /// ws://127.0.0.1:15674/ws for Web-STOMP.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    #[arg(long)]
    login: Option<String>,
    #[arg(long)]
    passcode: Option<String>,
    /// Destination prefix for SUBSCRIBE and SEND.
    #[arg(long, default_value = "/topic/")]
    prefix: String,
    /// Bounds each connect, CONNECT and SUBSCRIBE receipt.
    #[arg(long, default_value = "30s", value_parser = fanout::parse_duration)]
    timeout: Duration,
}

impl Target {
    fn endpoint(&self) -> stomp::Endpoint {
        stomp::Endpoint {
            url: self.url.clone(),
            login: self.login.clone(),
            passcode: self.passcode.clone(),
            timeout: self.timeout,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let nofile = procs::raise_nofile_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stompgate-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (name, result) = runtime.block_on(async {
        match cli.scenario {
            Scenario::Fanout { target, shape } => (
                "fanout",
                fanout::run_stomp(target.endpoint(), shape, target.prefix, cli.watch).await,
            ),
            Scenario::Conns {
                target,
                amqp_url,
                args,
            } => (
                "conns",
                conns::run(target.endpoint(), target.prefix, amqp_url, args, cli.watch).await,
            ),
            Scenario::Presence { target, shape } => (
                "presence",
                presence::run(target.endpoint(), shape, target.prefix, cli.watch).await,
            ),
            Scenario::AmqpFanout {
                amqp_url,
                connections,
                shape,
            } => (
                "amqp-fanout",
                amqp::run(amqp_url, connections, shape, cli.watch).await,
            ),
        }
    });
    // Connections still closing must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let mut line = json!({"scenario": name, "label": cli.label, "nofile_limit": nofile});
    let ok = match result {
        Ok(Value::Object(report)) => {
            if let Value::Object(line) = &mut line {
                line.extend(report);
            }
            true
        }
        Ok(_) => true,
        Err(e) => {
            line["error"] = Value::from(format!("{e:#}"));
            false
        }
    };
    println!("{line}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
