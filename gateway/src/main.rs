//! The `tollgate` command: parses arguments and starts things; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate::{logging, manifest, server::Gateway, server::StartError};

/// musl's malloc serialises on one lock and returns memory eagerly; the static image binary
/// spent ~1.4x the glibc build's CPU per handshake with it (BENCHMARKS.md, "The container
/// image's binary"). glibc builds keep glibc's allocator, which measured well.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "WebSocket API gateway with WebAssembly handshake policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the APIs in the manifest until SIGTERM/SIGINT.
    Run {
        #[arg(long, short)]
        manifest: PathBuf,
    },
    /// Validate the manifest (and everything it references) without serving; exit 1 with every
    /// error found.
    Check {
        #[arg(long, short)]
        manifest: PathBuf,
    },
    /// Interactive WebSocket client for testing an API from a terminal: prints the handshake
    /// status, sends typed lines, prints received messages (`>` sent, `<` received).
    /// Commands: /binary HEX, /ping [TEXT], /close [CODE [REASON]]; Ctrl-D closes and exits.
    Console {
        /// ws:// or wss:// URL, e.g. ws://127.0.0.1:8080/echo
        url: String,
        /// Extra handshake header, `Name: value` (repeatable).
        #[arg(long = "header", short = 'H', value_name = "K:V")]
        headers: Vec<String>,
        /// Query parameter added to the URL, `name=value` (repeatable).
        #[arg(long, short = 'q', value_name = "k=v", value_parser = parse_pair)]
        query: Vec<(String, String)>,
        /// Offered subprotocol (repeatable).
        #[arg(long = "subprotocol", short = 'p', value_name = "P")]
        subprotocols: Vec<String>,
        /// CA certificate (PEM) to trust for a wss URL, besides the system's.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
    /// Upgrade the running gateway's binary (SIGUSR2 to the pid in `gateway.pid_file`) and
    /// wait until the new process serves; exit 1 if the gateway did not upgrade (it keeps
    /// serving; its log says why).
    Upgrade {
        /// The manifest the gateway runs with (its `gateway.pid_file` names the process).
        #[arg(
            long,
            short,
            conflicts_with = "pid_file",
            required_unless_present = "pid_file"
        )]
        manifest: Option<PathBuf>,
        /// The pid file itself (when the manifest at hand does not load, e.g. mid-edit).
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Seconds to wait for the new process (it compiles plugins first).
        #[arg(long, default_value_t = 130)]
        wait: u64,
    },
    /// Work with plugin files.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Print a plugin's declaration (name, version, capabilities) and its imports, after the
    /// same checks `run` applies; exit 1 if the plugin would be refused.
    Inspect { file: PathBuf },
}

fn main() -> ExitCode {
    tollgate::upgrade::at_start();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { manifest } => check(&manifest),
        Command::Run { manifest } => run(&manifest),
        Command::Upgrade {
            manifest,
            pid_file,
            wait,
        } => upgrade(manifest, pid_file, std::time::Duration::from_secs(wait)),
        Command::Plugin {
            command: PluginCommand::Inspect { file },
        } => inspect(&file),
        Command::Console {
            url,
            headers,
            query,
            subprotocols,
            ca,
        } => console(tollgate::console::TermArgs {
            url,
            headers,
            query,
            subprotocols,
            ca_file: ca,
        }),
    }
}

/// `tollgate upgrade`: signals the gateway the pid file names and watches the file. The new
/// process writes its pid there once it serves; a gateway that did not upgrade (the new binary
/// failed, or an upgrade was already under way) rewrites it with its own.
fn upgrade(
    manifest: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    wait: std::time::Duration,
) -> ExitCode {
    let file = match (pid_file, manifest) {
        (Some(f), _) => f,
        (None, Some(m)) => match manifest::load(&m) {
            Ok(c) => match c.gateway.pid_file {
                Some(f) => f,
                None => {
                    eprintln!(
                        "{}: gateway.pid_file is not set; tollgate upgrade finds the running gateway by it",
                        m.display()
                    );
                    return ExitCode::from(2);
                }
            },
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("(the gateway is not signalled; fix the manifest, or pass --pid-file)");
                return ExitCode::from(2);
            }
        },
        (None, None) => return ExitCode::from(2),
    };
    // Every write of the pid file is a new file (renamed into place): a rewrite, even one
    // within the file system's timestamp granularity, is a new inode.
    let stamp = |f: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(f).map(|m| (m.dev(), m.ino())).ok()
    };
    let Some(old) = tollgate::notify::read_pid(&file) else {
        eprintln!("{}: no pid in it (is the gateway running?)", file.display());
        return ExitCode::from(1);
    };
    if !tollgate::notify::is_tollgate(old) {
        eprintln!(
            "{}: pid {old} is not a running tollgate process (a stale pid file?); nothing signalled",
            file.display()
        );
        return ExitCode::from(1);
    }
    let before = stamp(&file);
    // SAFETY: kill(2) with a pid read from the gateway's pid file (a positive process id of a
    // running tollgate process, checked above) and a signal the gateway handles; it has no
    // memory effects in this process.
    if unsafe { libc::kill(old as i32, libc::SIGUSR2) } != 0 {
        eprintln!(
            "cannot signal pid {old} (from {}): {}",
            file.display(),
            std::io::Error::last_os_error()
        );
        return ExitCode::from(1);
    }
    let running = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        match tollgate::notify::read_pid(&file) {
            Some(new) if new != old && running(new) => {
                println!("upgraded: pid {old} -> {new} (the old process hands over its connections and exits)");
                return ExitCode::SUCCESS;
            }
            Some(same) if same == old && stamp(&file) != before => {
                eprintln!("the gateway (pid {old}) did not upgrade and keeps serving: see its upgrade_failed or upgrade_ignored record");
                return ExitCode::from(1);
            }
            _ if !running(old) => {
                eprintln!("the gateway (pid {old}) exited and no new process wrote the pid file");
                return ExitCode::from(1);
            }
            _ => {}
        }
    }
    eprintln!(
        "no new process wrote {} within {}s; the gateway (pid {old}) may still be upgrading",
        file.display(),
        wait.as_secs()
    );
    ExitCode::from(1)
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected name=value"))
}

fn console(args: tollgate::console::TermArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(tollgate::console::terminal(args));
    // stdin's reader thread may still be blocked in read(2): do not wait for it.
    runtime.shutdown_background();
    ExitCode::from(code as u8)
}

fn inspect(file: &std::path::Path) -> ExitCode {
    let host = match tollgate::policy::PolicyHost::new(None) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    match host.load(file) {
        Ok(mut p) => {
            if let Err(e) = host.measure_instantiation(&mut p) {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
            print!("{}", p.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    logging::init_check();
    let config = match manifest::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s) in {}", errors.0.len(), path.display());
            return ExitCode::from(1);
        }
    };
    let n = config.apis.len();
    match Gateway::build(config) {
        Ok(_) => {
            println!("{}: ok ({n} API(s) served by this gateway)", path.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                match e {
                    StartError::Located(_) | StartError::Chain(_) => eprintln!("{e}"),
                    _ => eprintln!("{}: {e}", path.display()),
                }
            }
            eprintln!("{} error(s) in {}", errors.len(), path.display());
            ExitCode::from(1)
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    // Started by a binary upgrade: the running gateway's sockets are read first, so a failure
    // anywhere below can be told to it (it then keeps serving).
    let mut inherited = match tollgate::upgrade::Inherited::from_env() {
        None => None,
        Some(Ok(i)) => Some(i),
        Some(Err(e)) => {
            eprintln!("cannot take over from the running gateway: {e}");
            return ExitCode::from(1);
        }
    };
    let refuse = |inherited: &mut Option<tollgate::upgrade::Inherited>, reason: &str| {
        if let Some(i) = inherited {
            i.failed(reason);
        }
    };
    // Before anything is read: a change made while the gateway starts is reloaded, not lost.
    let baseline = tollgate::reload::Baseline::before_reading(path);
    let config = match manifest::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            refuse(&mut inherited, &errors.to_string());
            return ExitCode::from(1);
        }
    };
    logging::init();
    tollgate::descriptors::raise_and_log(config.gateway.limits.max_connections);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            refuse(&mut inherited, &format!("cannot start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let baseline = baseline.with_files_of(&config);
    // Built before the runtime starts: loading plugins runs guest code (declare, configure) to
    // completion on this thread, which an async worker must not do.
    let gw = match Gateway::build(config) {
        Ok(gw) => gw,
        Err(errors) => {
            for e in &errors {
                tracing::error!(error = %e, "cannot start");
                match e {
                    StartError::Located(_) | StartError::Chain(_) => eprintln!("{e}"),
                    _ => eprintln!("{}: {e}", path.display()),
                }
            }
            let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
            refuse(&mut inherited, &reasons.join("; "));
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        // Every signal handler is installed before `run` binds the listeners: a signal sent as
        // soon as the gateway logs `listening` must not meet the default action (exit).
        use tokio::signal::unix::{signal, SignalKind};
        let hup = signal(SignalKind::hangup())
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload on file changes only");
            })
            .ok();
        let stop = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        tokio::spawn(tollgate::reload::watch(gw.reloader(), baseline, hup));
        let stop_gateway = gw.stop_token();
        tokio::spawn(async move {
            wait_for_signal(stop).await;
            stop_gateway.cancel();
        });
        // SIGUSR2: upgrade the binary (tollgate::upgrade).
        match signal(SignalKind::user_defined2()) {
            Ok(mut usr2) => {
                let gw = gw.clone();
                tokio::spawn(async move {
                    // Each on a task of its own, so one that arrives during an upgrade is seen
                    // (and ignored) at once rather than queued behind it.
                    while usr2.recv().await.is_some() {
                        let gw = gw.clone();
                        tokio::spawn(async move { gw.upgrade().await });
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGUSR2; binary upgrades are off")
            }
        }
        if let Some(i) = &inherited {
            tracing::info!(
                event = "upgrade_received",
                old_pid = i.old_pid,
                pid = std::process::id(),
                "started by a binary upgrade: taking over the running gateway's listening sockets"
            );
        }
        match gw.run_inheriting(inherited).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("{e}");
                ExitCode::from(1)
            }
        }
    })
}

type SignalStream = std::io::Result<tokio::signal::unix::Signal>;

/// Returns at the first SIGTERM or SIGINT (or Ctrl-C, if the handlers could not be installed).
async fn wait_for_signal(stop: (SignalStream, SignalStream)) {
    match stop {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
