//! The load client. Single-threaded (it shares CPU 0 with the backend), no allocation per
//! message: each connection writes pre-masked frames from one buffer and counts echoes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::wire;

#[derive(clap::Args, Clone)]
pub struct LoadArgs {
    /// throughput | handshakes | idle | pending
    #[arg(long)]
    pub scenario: String,
    #[arg(long)]
    pub addr: String,
    #[arg(long, default_value = "/echo")]
    pub path: String,
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// `binary`, `text` (multi-byte UTF-8, which the gateway validates as it streams) or `json`
    /// (text that is ASCII JSON, what most WebSocket APIs send).
    #[arg(long, default_value = "binary")]
    pub opcode: String,
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Extra request header `Name: value` on every handshake (repeatable).
    #[arg(long)]
    pub header: Vec<String>,
}

impl LoadArgs {
    fn extra_headers(&self) -> String {
        self.header.iter().map(|h| format!("{h}\r\n")).collect()
    }
}

#[derive(serde::Serialize)]
struct Result {
    ops: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    match args.scenario.as_str() {
        "throughput" => throughput(args).await,
        "handshakes" => handshakes(args).await,
        "idle" => idle(args).await,
        "pending" => pending(args).await,
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

fn percentile(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize] as f64
}

/// `size` bytes of valid UTF-8 repeating `pattern` (ASCII padding at the end).
fn text_payload(size: usize, pattern: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    for c in pattern.chars().cycle() {
        if v.len() + c.len_utf8() > size {
            break;
        }
        let mut b = [0u8; 4];
        v.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
    }
    v.resize(size, b'x');
    v
}

async fn throughput(a: LoadArgs) -> anyhow::Result<()> {
    let (op, payload) = match a.opcode.as_str() {
        // 1- to 4-byte characters.
        "text" => (1, text_payload(a.size, "κόσμε 𝄞 Hello ")),
        "json" => (
            1,
            text_payload(
                a.size,
                r#"{"id":12345,"user":"alice","event":"price","value":101.25},"#,
            ),
        ),
        "binary" => (2, vec![b'x'; a.size]),
        other => anyhow::bail!("unknown opcode {other} (binary, text or json)"),
    };
    let frame = wire::encode(op, &payload, Some([1, 2, 3, 4]));
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration);
    let mut tasks = Vec::new();
    let started = Instant::now();
    let extra = a.extra_headers();
    for _ in 0..a.connections {
        let (addr, path, frame) = (a.addr.clone(), a.path.clone(), frame.clone());
        let (window, extra) = (a.window, extra.clone());
        tasks.push(tokio::spawn(async move {
            conn_throughput(&addr, &path, &extra, &frame, window, deadline).await
        }));
    }
    let mut ops = 0;
    let mut errors = 0;
    let mut lat = Vec::new();
    for t in tasks {
        match t.await? {
            Ok((n, l)) => {
                ops += n;
                lat.extend(l);
            }
            Err(e) => {
                eprintln!("connection error: {e:#}");
                errors += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let r = Result {
        ops,
        secs,
        p50_us: percentile(&mut lat, 0.5),
        p99_us: percentile(&mut lat, 0.99),
        errors,
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

async fn conn_throughput(
    addr: &str,
    path: &str,
    extra: &str,
    frame: &[u8],
    window: usize,
    deadline: Instant,
) -> anyhow::Result<(u64, Vec<u32>)> {
    let (mut s, mut buf) = wire::connect(addr, path, extra).await?;
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(window);
    let mut lat = Vec::with_capacity(100_000);
    for _ in 0..window {
        s.write_all(frame).await?;
        sent.push_back(Instant::now());
    }
    let mut done = 0u64;
    let mut chunk = vec![0u8; 256 * 1024];
    let mut stop = false;
    while !sent.is_empty() {
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed by peer");
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        let mut completed = 0;
        while let Some((h, len, _, _)) = wire::frame_at(&buf[used..]) {
            used += h + len;
            completed += 1;
        }
        buf.drain(..used);
        let now = Instant::now();
        if !stop && now >= deadline {
            stop = true;
        }
        for _ in 0..completed {
            if let Some(t) = sent.pop_front() {
                lat.push((now - t).as_micros() as u32);
                done += 1;
            }
            if !stop {
                // One write per message, as independent clients would send them: the proxy
                // sees realistic segment sizes rather than one big batch.
                s.write_all(frame).await?;
                sent.push_back(Instant::now());
            }
        }
    }
    let close = wire::encode(8, &1000u16.to_be_bytes(), Some([1, 2, 3, 4]));
    let _ = s.write_all(&close).await;
    Ok((done, lat))
}

async fn handshakes(a: LoadArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let extra = a.extra_headers();
    for _ in 0..a.connections {
        let (addr, path, extra) = (a.addr.clone(), a.path.clone(), extra.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let close = wire::encode(8, &1000u16.to_be_bytes(), Some([1, 2, 3, 4]));
            while Instant::now() < deadline {
                let t = Instant::now();
                match wire::connect(&addr, &path, &extra).await {
                    Ok((mut s, _)) => {
                        lat.push(t.elapsed().as_micros() as u32);
                        // Close properly: our close, their close, then the socket.
                        let _ = s.write_all(&close).await;
                        let mut b = [0u8; 256];
                        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let r = Result {
        ops: lat.len() as u64,
        secs: started.elapsed().as_secs_f64(),
        p50_us: percentile(&mut lat, 0.5),
        p99_us: percentile(&mut lat, 0.99),
        errors,
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Opens `connections` WebSockets, says `ready N` and holds them idle until stdin closes or
/// says anything.
async fn idle(a: LoadArgs) -> anyhow::Result<()> {
    let mut socks = Vec::with_capacity(a.connections);
    let mut errors = 0u64;
    let extra = a.extra_headers();
    for _ in 0..a.connections {
        match wire::connect(&a.addr, &a.path, &extra).await {
            Ok((s, _)) => socks.push(s),
            Err(e) => {
                errors += 1;
                if errors == 1 {
                    eprintln!("idle connect error: {e:#}");
                }
            }
        }
    }
    println!("ready {} {errors}", socks.len());
    let mut line = String::new();
    let _ = tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    Ok(())
}

/// Sends `connections` handshake requests whose answer the backend withholds (the path must
/// lead to the backend's `/stall`), says `ready N`, and holds them in flight until stdin closes
/// or says anything: the proxy then has N handshakes past its policies, waiting on the backend.
async fn pending(a: LoadArgs) -> anyhow::Result<()> {
    let mut socks = Vec::with_capacity(a.connections);
    let mut errors = 0u64;
    let extra = a.extra_headers();
    for _ in 0..a.connections {
        match wire::send_request(&a.addr, &a.path, &extra).await {
            Ok(s) => socks.push(s),
            Err(e) => {
                errors += 1;
                if errors == 1 {
                    eprintln!("pending connect error: {e:#}");
                }
            }
        }
    }
    // Give the proxy time to run every request's policies and reach the backend.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A request the proxy already answered (an error) is not in flight: count what is still
    // silent.
    let mut silent = 0;
    for s in &mut socks {
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => silent += 1,
            _ => errors += 1,
        }
    }
    println!("ready {silent} {errors}");
    let mut line = String::new();
    let _ = tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    Ok(())
}
