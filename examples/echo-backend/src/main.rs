//! A WebSocket echo server. Every text or binary message is sent back as it came; pings are
//! answered by tungstenite; a close is answered with the same code. It also answers any
//! subprotocol the client offers first, so subprotocol negotiation can be tried end to end.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(about = "WebSocket echo server for the Tollgate quickstart")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen).await?;
    println!("echo-backend listening on ws://{}/", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve(stream).await {
                eprintln!("echo-backend: connection ended with error: {e}");
            }
        });
    }
}

// tungstenite fixes the callback's error type (a full HTTP response); it is not ours to shrink.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream) -> anyhow::Result<()> {
    let callback = |req: &Request, mut resp: Response| {
        // Choose the first offered subprotocol, as a real server with a catch-all would.
        let first = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|p| p.trim().to_owned());
        if let Some(p) = first.and_then(|p| HeaderValue::from_str(&p).ok()) {
            resp.headers_mut().insert("sec-websocket-protocol", p);
        }
        Ok(resp)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback).await?;
    while let Some(msg) = ws.next().await {
        match msg? {
            m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await?,
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}
