//! TLS on both sides: wss backends verified against a CA made in the test (chain and host
//! name), and a wss listener.

use crate::support::tls::*;
use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn wss_backend_needs_trusted_chain_and_matching_name() {
    let ca = TestCa::new("Tollgate Test CA");
    let good = wss_echo_backend(&ca.leaf(&["localhost", "127.0.0.1"])).await;
    let wrong_name = wss_echo_backend(&ca.leaf(&["other.example"])).await;
    let dir = TempDir::new("tls");
    let ca_path = ca.write(dir.path(), "ca.pem");
    let manifest = format!(
        "{}{}{}{}",
        gateway_section(""),
        api_section(
            "trusted",
            "trusted",
            &format!("wss://localhost:{}/", good.port()),
            &format!("ca_file = \"{}\"", ca_path.display())
        ),
        api_section(
            "untrusted",
            "untrusted",
            &format!("wss://localhost:{}/", good.port()),
            ""
        ),
        api_section(
            "misnamed",
            "misnamed",
            &format!("wss://localhost:{}/", wrong_name.port()),
            &format!("ca_file = \"{}\"", ca_path.display())
        ),
    );
    let gw = Gateway::start_in(dir, &manifest);

    let (mut ws, _) = tokio_tungstenite::connect_async(gw.ws_url("/trusted"))
        .await
        .unwrap();
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("over tls"));

    let (head, _) = raw_handshake(gw.ws.unwrap(), "/untrusted", "").await;
    assert_eq!(status_of(&head), 502, "{head}");
    let rec = gw
        .wait_record("handshake", |v| v["api"] == "untrusted")
        .await;
    assert!(rec["reason"].as_str().unwrap().contains("TLS"), "{rec}");

    let (head, _) = raw_handshake(gw.ws.unwrap(), "/misnamed", "").await;
    assert_eq!(status_of(&head), 502, "{head}");
    let rec = gw
        .wait_record("handshake", |v| v["api"] == "misnamed")
        .await;
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("TLS") && reason.to_lowercase().contains("name"),
        "{rec}"
    );
}

/// `insecure_skip_verify = true` accepts a backend certificate nobody vouches for (and a name
/// that does not match), and says so loudly: a WARN record at start naming the API, and a
/// WARN line from `tollgate check`.
#[tokio::test]
async fn insecure_skip_verify_connects_to_an_untrusted_backend_and_warns() {
    let ca = TestCa::new("Nobody's CA");
    let backend = wss_echo_backend(&ca.leaf(&["other.example"])).await;
    let dir = TempDir::new("tls-insecure");
    let manifest = format!(
        "{}{}",
        gateway_section(""),
        api_section(
            "lab",
            "lab",
            &format!("wss://localhost:{}/", backend.port()),
            "insecure_skip_verify = true"
        ),
    );
    let (code, err, _) = tollgate_check(dir.path(), &manifest);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains("insecure_skip_verify") && l.contains("lab")),
        "{err}"
    );
    let gw = Gateway::start_in(dir, &manifest);
    let warning = gw
        .wait_record("insecure_skip_verify", |r| r["api"] == "lab")
        .await;
    assert_eq!(warning["level"], "WARN");
    assert!(
        warning["message"]
            .as_str()
            .unwrap()
            .contains("NOT verified"),
        "{warning}"
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.ws_url("/lab"))
        .await
        .unwrap();
    ws.send(Message::text("anyone")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("anyone"));
}

#[tokio::test]
async fn wss_listener_serves_clients() {
    let ca = TestCa::new("Listener CA");
    let leaf = ca.leaf(&["localhost"]);
    let dir = TempDir::new("wss");
    let (cert, key) = leaf.write(dir.path(), "gw");
    let backend = RawBackend::start(echo_frames()).await;
    // The probe policy reports the TLS facts the gateway hands to policies.
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let manifest = format!(
        "[gateway]\nname = \"t\"\nplugin_dir = \"plugins\"\n[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n{}",
        cert.display(),
        key.display(),
        api_section(
            "echo",
            "echo",
            &backend.url(),
            "schemes = [\"wss\"]\n[[apis.on_handshake]]\nplugin = \"faulty\"\nconfig = { mode = \"tls\" }"
        )
    );
    let gw = Gateway::start_in(dir, &manifest);
    let addr = gw.wss.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca));
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut ws, resp) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/echo", addr.port()), tls)
            .await
            .unwrap();
    let probe = resp
        .headers()
        .get("x-probe")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        probe.starts_with("ok: TLSv1.3 TLS13_") && probe.ends_with(" localhost"),
        "TLS facts seen by the policy: {probe:?}"
    );
    ws.send(Message::text("secure hello")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("secure hello")
    );
    let seen = backend.last_head();
    assert_eq!(header(&seen, "x-forwarded-proto").as_deref(), Some("https"));
    ws.close(None).await.unwrap();
}

/// A wss client of a plain ws backend: at the end of the connection the gateway ends its TLS
/// session properly (close_notify), so the client can tell a complete end from a truncation
/// (rustls reports an end without close_notify as an unexpected EOF).
#[tokio::test]
async fn a_wss_client_of_a_ws_backend_gets_close_notify_at_the_end() {
    let ca = TestCa::new("Close-notify CA");
    let leaf = ca.leaf(&["localhost"]);
    let dir = TempDir::new("wss-close");
    let (cert, key) = leaf.write(dir.path(), "gw");
    let backend = RawBackend::start(echo_frames()).await;
    let manifest = format!(
        "[gateway]\nname = \"t\"\n[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n{}",
        cert.display(),
        key.display(),
        api_section("echo", "echo", &backend.url(), "schemes = [\"wss\"]")
    );
    let gw = Gateway::start_in(dir, &manifest);
    let addr = gw.wss.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(&ca))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (head, mut ws) = handshake_on(tls, "localhost", "/echo", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    ws.close(1000, "done").await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1000));
    let mut rest = Vec::new();
    let end = {
        use tokio::io::AsyncReadExt;
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            ws.io.read_to_end(&mut rest),
        )
        .await
        .expect("the gateway never ended the connection")
    };
    assert!(
        end.is_ok(),
        "the TLS session ended without close_notify: {end:?}"
    );
}
