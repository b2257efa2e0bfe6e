//! Minimal RFC 6455 pieces for the benchmark's own client and backend. Written by hand so the
//! load generator spends as little CPU as possible per message (no per-message allocation, no
//! UTF-8 validation) and so the backend never becomes the bottleneck.

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// One complete frame at the front of `buf`: (header length, payload length, masked, opcode).
pub fn frame_at(buf: &[u8]) -> Option<(usize, usize, Option<[u8; 4]>, u8)> {
    if buf.len() < 2 {
        return None;
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut h) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(a) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let mask = if masked {
        if buf.len() < h + 4 {
            return None;
        }
        let m = [buf[h], buf[h + 1], buf[h + 2], buf[h + 3]];
        h += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < h + len {
        return None;
    }
    Some((h, len, mask, buf[0] & 0x0f))
}

pub fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut v = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => v.push(m | n as u8),
        n if n < 65536 => {
            v.push(m | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(m | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            v.extend_from_slice(&k);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => v.extend_from_slice(payload),
    }
    v
}

/// Reads an HTTP head; returns bytes read past it.
pub async fn read_head(s: &mut TcpStream) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed during handshake");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends a client handshake request; `extra` is zero or more preformatted `Name: value\r\n`
/// lines (e.g. the benchmark's `Authorization` header).
pub async fn send_request(addr: &str, path: &str, extra: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    Ok(s)
}

/// Client handshake; returns the socket and any bytes past the 101.
pub async fn connect(addr: &str, path: &str, extra: &str) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut s = send_request(addr, path, extra).await?;
    let (head, rest) = read_head(&mut s).await?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "handshake failed: {head}");
    anyhow::ensure!(head.contains(ACCEPT), "wrong Sec-WebSocket-Accept: {head}");
    Ok((s, rest))
}

/// Echo backend: answers the handshake (any key: the accept is computed), then echoes every
/// data frame unmasked and answers a close with a close. A request for a path starting with
/// `/stall` is never answered (the memory scenario holds handshakes open at the backend); the
/// connection is held until the peer closes it.
pub async fn echo_backend(listen: String) -> anyhow::Result<()> {
    let l = TcpListener::bind(&listen).await?;
    println!("ready {}", l.local_addr()?);
    loop {
        let (s, _) = l.accept().await?;
        tokio::spawn(async move {
            let _ = echo_conn(s).await;
        });
    }
}

fn accept_for(key: &str) -> String {
    use base64::Engine;
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Appends a server (unmasked) frame header for `len` payload bytes.
fn push_header(out: &mut Vec<u8>, op: u8, len: usize) {
    out.push(0x80 | op);
    match len {
        n if n < 126 => out.push(n as u8),
        n if n < 65536 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
}

async fn echo_conn(mut s: TcpStream) -> anyhow::Result<()> {
    s.set_nodelay(true)?;
    let (head, mut buf) = read_head(&mut s).await?;
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    if head.split(' ').nth(1).is_some_and(|p| p.contains("/stall")) {
        let mut sink = [0u8; 1024];
        while s.read(&mut sink).await? > 0 {}
        return Ok(());
    }
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_for(&key)
    );
    s.write_all(resp.as_bytes()).await?;
    let mut out = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut used = 0;
        out.clear();
        let mut closed = false;
        while let Some((h, len, mask, op)) = frame_at(&buf[used..]) {
            let payload = &buf[used + h..used + h + len];
            push_header(&mut out, op, len);
            let start = out.len();
            out.extend_from_slice(payload);
            if let Some(k) = mask {
                for (i, b) in out[start..].iter_mut().enumerate() {
                    *b ^= k[i % 4];
                }
            }
            used += h + len;
            if op == 8 {
                closed = true;
                break;
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
        }
        if closed {
            return Ok(());
        }
        buf.drain(..used);
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The reference relay: accept, connect upstream, `copy_bidirectional`.
pub async fn tcp_relay(listen: String, upstream: String) -> anyhow::Result<()> {
    let l = TcpListener::bind(&listen).await?;
    println!("ready {}", l.local_addr()?);
    loop {
        let (mut c, _) = l.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let _ = c.set_nodelay(true);
            let Ok(mut b) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = b.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_matches_rfc() {
        assert_eq!(super::accept_for(super::KEY), super::ACCEPT);
    }
}
