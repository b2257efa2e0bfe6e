//! `tollgate-bench`: measures Tollgate side by side with a direct connection, a plain tokio TCP
//! relay, and nginx and HAProxy when they are installed, in one run, alternating between them.
//!
//! The proxy under test is pinned to CPU 1; the load client and the echo backend share CPU 0.
//! On two cores the load client saturates first, so messages/s mostly ties; the deciding figure
//! is each proxy's own CPU time (utime + stime of its process tree, from /proc) per round trip
//! and per handshake. See BENCHMARKS.md for figures and the exact command.
//!
//! Sub-commands `backend`, `tcp-relay` and `load` are the pieces the orchestrator starts as
//! separate, pinned processes.

mod chain;
mod fleet;
mod load;
mod orchestrate;
mod proc;
mod soak;
mod upgrade;
mod wire;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tollgate benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every scenario against every available target and print a Markdown report.
    Run(orchestrate::RunArgs),
    /// Raw frame echo backend.
    Backend {
        #[arg(long)]
        listen: String,
    },
    /// Plain tokio `copy_bidirectional` TCP relay (the reference "no WebSocket awareness" proxy).
    TcpRelay {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        upstream: String,
    },
    /// Load client: prints one JSON result line.
    Load(load::LoadArgs),
    /// The policy chain's own time per handshake, in process: one JSON line per measurement.
    Chain(chain::ChainArgs),
    /// Mixed traffic (handshakes with policies, relays, reloads) for a long time; reports the
    /// gateway's memory, descriptors, threads and tasks every interval (BENCHMARKS.md, "Soak").
    Soak(soak::SoakArgs),
    /// A binary upgrade (SIGUSR2) under idle and echoing connections: total time, pause per
    /// connection, connections lost (BENCHMARKS.md, "Binary upgrade").
    Upgrade(upgrade::UpgradeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli
        .command
        .unwrap_or(Cmd::Run(orchestrate::RunArgs::default()))
    {
        Cmd::Run(args) => orchestrate::run(args),
        Cmd::Backend { listen } => current_thread(wire::echo_backend(listen)),
        Cmd::TcpRelay { listen, upstream } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(wire::tcp_relay(listen, upstream)),
        Cmd::Load(args) => current_thread(load::run(args)),
        Cmd::Chain(args) => chain::run(args),
        Cmd::Soak(args) => soak::run(args),
        Cmd::Upgrade(args) => upgrade::run(args),
    }
}

fn current_thread<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}
