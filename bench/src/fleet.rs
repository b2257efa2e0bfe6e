//! The fleet targets (issue 19), asked for with `run --fleet` (or by naming them in `--only`):
//! `tollgate-limits` is the no-policy `tollgate` target plus a product whose subscription has a
//! `max_connections` too high to ever refuse, counted in the process; `tollgate-fleet` is the
//! same manifest plus `[cluster]`, so the same limit is counted in a `redis-server` this tool
//! starts (pinned to CPU 0, with the load client and the backend, so that it is not on the
//! proxy's CPU), empties before each start of the target and stops at the end.
//!
//! What Redis does during the fleet target's handshake rounds is read from `INFO commandstats`
//! before and after each round (`redis-cli`). Commands a Lua script runs are counted there too,
//! and each of the gateway's three scripts (`gateway/src/cluster.rs`) has its own signature,
//! so the script calls can be told apart: a heartbeat runs `HLEN` once; an acquire runs `TIME`
//! once (so does a heartbeat) and, past its lease check, `HGETALL` once per limited thing (a
//! heartbeat once, on the leases), then `HINCRBY` once per thing when admitted; a release runs
//! `HINCRBY` once per thing. The bench's API has no `max_connections`, so every acquire and
//! release here touches exactly one thing, the subscription. Releases are batched (the
//! gateway gives back the slots of the connections closed within a few milliseconds in one
//! call), so there are fewer release calls than closes; that every slot came back is checked
//! on the store itself after each round (no slot hash left). The gateway also reads the fleet's
//! counts for `/apis` once per `lease_ttl / 3` (10 s here, the first 10 s after its start),
//! which runs `TIME`, `HGETALL` and `HGET`: a round that holds such a read is reported as not
//! adding up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::orchestrate::{free_port, Proc, RunArgs};

/// The targets this module adds.
pub(crate) const TARGETS: [&str; 2] = ["tollgate-limits", "tollgate-fleet"];

/// The subscription key every handshake of a fleet run carries (header below).
pub(crate) const SUB_KEY: &str = "tollgate-bench-subscription-key-0001";

/// High enough that no bench scenario is ever refused: the limit is checked, never hit.
pub(crate) const SUB_LIMIT: u64 = 100_000;

/// `store_timeout` of the fleet target (the gateway's default, left as it is).
pub(crate) const STORE_TIMEOUT_MS: f64 = 50.0;

/// Whether this run has the fleet targets: `--fleet`, or one of them named in `--only`.
pub(crate) fn wanted(args: &RunArgs) -> bool {
    args.fleet
        || args
            .only
            .as_deref()
            .is_some_and(|l| l.split(',').any(|x| TARGETS.contains(&x.trim())))
}

/// The header carrying the subscription key (the gateway's default header name).
pub(crate) fn key_header() -> String {
    format!("Ocp-Apim-Subscription-Key: {SUB_KEY}")
}

/// Whether `name` is one of the targets with a subscription.
pub(crate) fn has_subscription(name: &str) -> bool {
    TARGETS.contains(&name)
}

/// The manifest's product and subscription (before `[[apis]]`); the key is given by its
/// SHA-256, so the manifest is all the gateway needs.
pub(crate) fn products_section() -> String {
    use rsa::sha2::{Digest, Sha256};
    let digest: String = Sha256::digest(SUB_KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "[[products]]\nname = \"bench\"\n\
         [[products.subscriptions]]\nname = \"bench-sub\"\nmax_connections = {SUB_LIMIT}\n\
         primary_key_sha256 = \"{digest}\"\n"
    )
}

/// The API's line that puts it in the product.
pub(crate) const API_PRODUCTS: &str = "products = [\"bench\"]\n";

/// `[cluster]` pointing at `url`, inserted before the products (every other setting default).
pub(crate) fn cluster_manifest(text: &str, url: &str) -> String {
    text.replacen(
        "[[products]]\n",
        &format!("[cluster]\nstore = \"{url}\"\n[[products]]\n"),
        1,
    )
}

/// A `redis-server` of this run, on a free loopback port, without persistence, pinned (CPU 0
/// unless `--redis-cpu` says otherwise); stopped (SIGTERM, by its pid) when dropped. Its
/// `redis-cli` calls run on CPU 0, between measurements.
pub(crate) struct Redis {
    proc: Proc,
    port: u16,
    cli: PathBuf,
}

impl Redis {
    /// `redis-server` (`--redis-server`, else the usual directories) and the `redis-cli` next
    /// to it or in the usual directories; None when either is missing.
    pub(crate) fn find(args: &RunArgs) -> Option<(PathBuf, PathBuf)> {
        let server = match &args.redis_server {
            Some(p) => p.exists().then(|| p.clone())?,
            None => crate::orchestrate::which("redis-server")?,
        };
        let beside = server.with_file_name("redis-cli");
        let cli = if beside.exists() {
            beside
        } else {
            crate::orchestrate::which("redis-cli")?
        };
        Some((server, cli))
    }

    /// Pinned to `cpu` (the bench's default: 0, with the load client and the backend).
    pub(crate) fn start(server: &Path, cli: &Path, cpu: u32) -> anyhow::Result<Redis> {
        let port = free_port()?;
        let proc = Proc::spawn(
            Command::new("taskset")
                .args(["-c", &cpu.to_string()])
                .arg(server)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let redis = Redis {
            proc,
            port,
            cli: cli.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis
            .cli(&["PING"])
            .map(|s| s.trim() != "PONG")
            .unwrap_or(true)
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(redis)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.id()
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("taskset")
            .args(["-c", "0"])
            .arg(&self.cli)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .context("redis-cli")?;
        anyhow::ensure!(out.status.success(), "redis-cli {args:?} failed");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Empties the store: a fresh gateway then runs its scripts on its own keys only (slots a
    /// stopped gateway left behind would otherwise be read by every acquire until their lease
    /// ran out).
    pub(crate) fn flush(&self) -> anyhow::Result<()> {
        self.cli(&["FLUSHALL"]).map(|_| ())
    }

    pub(crate) fn commandstats(&self) -> anyhow::Result<Stats> {
        Ok(Stats::parse(&self.cli(&["INFO", "commandstats"])?))
    }

    /// After a handshake round: waits (at most 3 s) until every slot has been given back (the
    /// gateway's releaser gives closed connections' slots back in batches: a slot hash whose
    /// last slot goes is deleted, so none is left), and returns the statistics then and whether
    /// every slot came back.
    pub(crate) fn settled(&self) -> anyhow::Result<(Stats, bool)> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let held = self.cli(&["--scan", "--pattern", "tollgate:*:slots:*"])?;
            let settled = held.trim().is_empty();
            if settled || Instant::now() >= deadline {
                return Ok((self.commandstats()?, settled));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `INFO commandstats`: per command, its requests: `calls` (executed, failed ones included)
/// plus `rejected_calls` (refused before running); and, as `<command>#failed`, its
/// `failed_calls` (an `EVALSHA` answered `NOSCRIPT` is one: the gateway then loads the script
/// and sends it again).
#[derive(Default, Clone, Debug, PartialEq)]
pub(crate) struct Stats(BTreeMap<String, u64>);

impl Stats {
    pub(crate) fn parse(info: &str) -> Stats {
        let mut m = BTreeMap::new();
        for line in info.lines() {
            let Some((name, rest)) = line
                .trim()
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |name: &str| -> u64 {
                rest.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == name)
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0)
            };
            m.insert(name.to_owned(), field("calls") + field("rejected_calls"));
            m.insert(format!("{name}#failed"), field("failed_calls"));
        }
        Stats(m)
    }

    fn get(&self, cmd: &str) -> u64 {
        self.0.get(cmd).copied().unwrap_or(0)
    }

    /// What happened between `before` and `self`.
    pub(crate) fn since(&self, before: &Stats) -> Stats {
        Stats(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k))))
                .collect(),
        )
    }

    pub(crate) fn add(&mut self, other: &Stats) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) += v;
        }
    }

    /// Requests that ran a script: one round trip each (`SCRIPT LOAD` after a `NOSCRIPT`
    /// counted too).
    pub(crate) fn script_calls(&self) -> u64 {
        self.get("evalsha") + self.get("eval") + self.get("script|load")
    }

    /// Requests a script's first use after a start costs extra: the `EVALSHA` answered
    /// `NOSCRIPT` and the `SCRIPT LOAD` (the gateway then sends the `EVALSHA` again).
    pub(crate) fn noscript_retries(&self) -> u64 {
        self.get("evalsha#failed") + self.get("script|load")
    }

    pub(crate) fn evalsha(&self) -> u64 {
        self.get("evalsha")
    }

    pub(crate) fn eval(&self) -> u64 {
        self.get("eval") + self.get("script|load")
    }

    /// Heartbeat scripts (the only one that runs `HLEN`).
    pub(crate) fn heartbeats(&self) -> u64 {
        self.get("hlen")
    }

    /// Acquire scripts, admitted or not (`TIME` runs once in each acquire and each heartbeat).
    pub(crate) fn acquires(&self) -> u64 {
        self.get("time").saturating_sub(self.heartbeats())
    }

    /// Acquires past the lease check (one `HGETALL` each with one limited thing; a heartbeat
    /// runs one too); with a limit that is never reached, every one of them is admitted.
    pub(crate) fn admitted(&self) -> u64 {
        self.get("hgetall").saturating_sub(self.heartbeats())
    }

    /// Release scripts (each a batch of closes): `HINCRBY`s that are not an admitted
    /// acquire's.
    pub(crate) fn releases(&self) -> u64 {
        self.get("hincrby").saturating_sub(self.admitted())
    }

    /// Whether the split adds up: every script call is an acquire, a release or a heartbeat
    /// (another script, e.g. a rate counter's, would break the split by signature).
    pub(crate) fn consistent(&self) -> bool {
        let runs = (self.get("evalsha") + self.get("eval"))
            .saturating_sub(self.get("evalsha#failed") + self.get("eval#failed"));
        runs == self.acquires() + self.releases() + self.heartbeats()
    }
}

/// What Redis did during the fleet target's handshake rounds, summed over the rounds.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) handshakes: u64,
    pub(crate) stats: Stats,
    /// `redis-server`'s own CPU time, seconds.
    pub(crate) redis_cpu: f64,
    /// Rounds after which the store still held slots 3 s later (a slot never given back).
    pub(crate) unsettled_rounds: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_calls_are_told_apart_by_the_commands_they_run() {
        // Two acquires, one release and one heartbeat, as the gateway's scripts run them.
        // The first release's EVALSHA is answered NOSCRIPT: SCRIPT LOAD, then EVALSHA again.
        let before = Stats::parse("# Commandstats\r\ncmdstat_evalsha:calls=10,usec=1,usec_per_call=0.10,rejected_calls=0,failed_calls=1\r\ncmdstat_time:calls=3,usec=1\r\n");
        let after = Stats::parse(
            "# Commandstats\r\n\
             cmdstat_evalsha:calls=15,usec=1,usec_per_call=0.10,rejected_calls=0,failed_calls=2\r\n\
             cmdstat_script|load:calls=1,usec=1\r\n\
             cmdstat_time:calls=6,usec=1\r\n\
             cmdstat_hget:calls=5,usec=1\r\n\
             cmdstat_hgetall:calls=3,usec=1\r\n\
             cmdstat_hincrby:calls=3,usec=1\r\n\
             cmdstat_hset:calls=1,usec=1\r\n\
             cmdstat_hlen:calls=1,usec=1\r\n\
             cmdstat_info:calls=7,usec=1\r\n",
        );
        let d = after.since(&before);
        assert_eq!(d.script_calls(), 6);
        assert_eq!(d.noscript_retries(), 2);
        assert_eq!(d.heartbeats(), 1);
        assert_eq!(d.acquires(), 2);
        assert_eq!(d.admitted(), 2);
        assert_eq!(d.releases(), 1);
        assert!(d.consistent());
        let mut sum = d.clone();
        sum.add(&d);
        assert_eq!(sum.releases(), 2);
    }

    #[test]
    fn the_fleet_manifest_is_the_limits_one_plus_cluster() {
        let limits = format!(
            "[gateway]\nname = \"bench\"\n{}[[apis]]\n",
            products_section()
        );
        let fleet = cluster_manifest(&limits, "redis://127.0.0.1:6379");
        assert!(fleet.contains("[cluster]\nstore = \"redis://127.0.0.1:6379\"\n[[products]]\n"));
        assert_eq!(
            fleet.replace("[cluster]\nstore = \"redis://127.0.0.1:6379\"\n", ""),
            limits
        );
        // The SHA-256 of the key, in hex.
        assert!(limits.contains("primary_key_sha256 = \"") && !limits.contains(SUB_KEY));
    }
}
