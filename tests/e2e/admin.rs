//! The admin listener at the edge: it answers only the Host names it is known by (so a page
//! that rebinds its DNS name to the gateway reads nothing), can require a token, bounds its
//! connections and request heads, and `tollgate check` warns when it is exposed without a
//! token.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Sends `head` (a complete request head, blank line included) on a new connection and reads
/// the answer until the gateway closes: (status, head, body). Status 0: closed without one.
async fn send(addr: SocketAddr, head: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    // Errors (a reset) end the read like EOF does: the answer so far is what counts.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("admin answer within 10 s");
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = if head.is_empty() { 0 } else { status_of(head) };
    (status, head.to_owned(), body.to_owned())
}

/// `GET path` with the given Host (none when `None`) and extra header lines.
async fn get(
    addr: SocketAddr,
    path: &str,
    host: Option<&str>,
    extra: &str,
) -> (u16, String, String) {
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    send(
        addr,
        &format!("GET {path} HTTP/1.1\r\n{host}{extra}Connection: close\r\n\r\n"),
    )
    .await
}

fn admin_manifest(admin_extra: &str, apis: &str) -> String {
    format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n{admin_extra}\n\n{apis}",
        gateway_section("")
    )
}

#[tokio::test]
async fn admin_answers_only_the_host_names_it_is_known_by() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&admin_manifest(
        "allowed_hosts = [\"admin.internal\", \"ops.example:8443\"]",
        &api_section("echo", "echo", &backend.url(), ""),
    ));
    let admin = gw.admin.unwrap();
    let port = admin.port();

    // A page on another site whose name now resolves to 127.0.0.1 sends its own name.
    for path in ["/apis", "/metrics", "/console", "/healthz"] {
        let (status, head, body) = get(admin, path, Some("evil.example"), "").await;
        assert_eq!(status, 421, "{path}: {head}");
        assert!(!body.contains("echo"), "{path}: {body}");
        let (status, head, _) = get(admin, path, Some(&format!("evil.example:{port}")), "").await;
        assert_eq!(status, 421, "{path}: {head}");
    }
    // ... and cannot make the gateway probe for it.
    let reached = backend.connections.load(Ordering::SeqCst);
    let (status, head, _) = get(
        admin,
        "/console/probe?target=/echo&scheme=ws",
        Some("evil.example"),
        "",
    )
    .await;
    assert_eq!(status, 421, "{head}");
    // An absolute-form target naming another host is misdirected too.
    let (status, head, _) = get(
        admin,
        "http://evil.example/apis",
        Some(&format!("127.0.0.1:{port}")),
        "",
    )
    .await;
    assert_eq!(status, 421, "{head}");

    // The names it is known by, with and without its port.
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        format!("localhost:{port}"),
        "LOCALHOST".to_owned(),
        format!("[::1]:{port}"),
        "admin.internal".to_owned(),
        format!("admin.internal:{port}"),
        "ops.example:8443".to_owned(),
    ] {
        let (status, head, body) = get(admin, "/apis", Some(&host), "").await;
        assert_eq!(status, 200, "{host}: {head}");
        assert!(body.contains("\"echo\""), "{host}: {body}");
    }
    for host in ["ops.example", "admin.internal:1", "localhost:1"] {
        assert_eq!(get(admin, "/apis", Some(host), "").await.0, 421, "{host}");
    }
    // The probe, asked properly, reaches the backend; asked by another site's page, it does not.
    let (status, _, body) = get(
        admin,
        "/console/probe?target=/echo&scheme=ws",
        Some(&format!("127.0.0.1:{port}")),
        "",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "{\"status\":101}"));
    let (status, head, _) = get(
        admin,
        "/console/probe?target=/echo&scheme=ws",
        Some(&format!("127.0.0.1:{port}")),
        "Sec-Fetch-Site: cross-site\r\nOrigin: https://evil.example\r\n",
    )
    .await;
    assert_eq!(status, 403, "{head}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.connections.load(Ordering::SeqCst) < reached + 1 {
        assert!(
            Instant::now() < deadline,
            "the allowed probe never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        reached + 1,
        "a refused probe reached the backend"
    );

    // No Host at all (HTTP/1.0 allows it; this listener does not), or two of them.
    let (status, head, _) = send(admin, "GET /apis HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 400, "{head}");
    let (status, head, _) = get(admin, "/apis", None, "").await;
    assert_eq!(status, 400, "{head}");
    let (status, head, _) = get(admin, "/apis", Some("127.0.0.1"), "Host: evil.example\r\n").await;
    assert_eq!(status, 400, "{head}");

    // Only GET (and HEAD) on admin paths.
    let host = format!("127.0.0.1:{port}");
    let (status, head, _) = send(
        admin,
        &format!(
            "POST /apis HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 405, "{head}");
    assert_eq!(header(&head, "allow").as_deref(), Some("GET, HEAD"));
    let (status, head, _) = send(
        admin,
        &format!("DELETE /console/probe?target=/echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 405, "{head}");

    // A request head over 8 KiB: 431.
    let big = format!("X-Filler: {}\r\n", "a".repeat(9 * 1024));
    let (status, head, _) = get(admin, "/healthz", Some(&host), &big).await;
    assert_eq!(status, 431, "{head}");
    assert_eq!(get(admin, "/healthz", Some(&host), "").await.0, 200);
}

#[tokio::test]
async fn admin_token_is_required_for_everything_but_the_health_checks() {
    let token = "admin-token-for-the-e2e-test-0123";
    let dir = TempDir::new("admin-token");
    let gw = Gateway::start_with_env(
        dir,
        &admin_manifest(
            "token_env = \"TOLLGATE_TEST_ADMIN_TOKEN\"",
            &api_section("echo", "echo", "ws://127.0.0.1:9/", ""),
        ),
        &[("TOLLGATE_TEST_ADMIN_TOKEN", token)],
    );
    let admin = gw.admin.unwrap();
    let host = Some("127.0.0.1");
    let with = |t: &str| format!("Authorization: Bearer {t}\r\n");

    for path in [
        "/apis",
        "/metrics",
        "/console/probe?target=/echo",
        "/nothing-here",
    ] {
        let (status, head, body) = get(admin, path, host, "").await;
        assert_eq!(status, 401, "{path}: {head}");
        assert!(
            header(&head, "www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
            "{path}: {head}"
        );
        assert!(!body.contains("echo"), "{path}: {body}");
        for wrong in [
            with("admin-token-for-the-e2e-test-012"),
            with(&format!("{token}x")),
            format!("Authorization: Basic {token}\r\n"),
            format!("Authorization: {token}\r\n"),
        ] {
            assert_eq!(
                get(admin, path, host, &wrong).await.0,
                401,
                "{path} {wrong}"
            );
        }
    }
    let (status, head, body) = get(admin, "/apis", host, &with(token)).await;
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("\"echo\""), "{body}");
    assert_eq!(get(admin, "/metrics", host, &with(token)).await.0, 200);
    assert_eq!(get(admin, "/nothing-here", host, &with(token)).await.0, 404);
    // Liveness and readiness stay open for orchestrators; the console's page holds no data
    // (it asks for the token and sends it itself).
    assert_eq!(get(admin, "/healthz", host, "").await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(admin, "/readyz", host, "").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, page) = get(admin, "/console", host, "").await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"token\""));
    // The right token does not make a wrong Host right.
    assert_eq!(
        get(admin, "/apis", Some("evil.example"), &with(token))
            .await
            .0,
        421
    );
    assert!(!gw.output().contains(token), "the admin token was logged");
}

#[tokio::test]
async fn admin_connections_are_capped_and_slow_heads_time_out() {
    let gw = Gateway::start(&admin_manifest(
        "",
        &api_section("echo", "echo", "ws://127.0.0.1:9/", ""),
    ));
    let admin = gw.admin.unwrap();
    // 64 connections that send nothing hold every slot ...
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // ... so the next one is closed at once, without an answer.
    let started = Instant::now();
    let (status, head, _) = get(admin, "/healthz", Some("127.0.0.1"), "").await;
    assert_eq!(status, 0, "answered over the cap: {head}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Freed slots are reused.
    idle.truncate(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(admin, "/healthz", Some("127.0.0.1"), "").await.0 != 200 {
        assert!(Instant::now() < deadline, "slots were not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A head that never ends is cut off after the 10 s header read timeout.
    let mut slow = idle.pop().unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a slow request head was not cut off");
    assert!(!String::from_utf8_lossy(&buf).contains(" 200 "));
}

#[tokio::test]
async fn check_warns_when_the_admin_listener_is_exposed_without_a_token() {
    let dir = TempDir::new("admin-check");
    let api = api_section("echo", "echo", "ws://127.0.0.1:9/", "");
    let exposed = format!(
        "{}[admin]\nlisten = \"0.0.0.0:0\"\n\n{api}",
        gateway_section("")
    );
    let (code, err, _) = tollgate_check(dir.path(), &exposed);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.lines().any(|l| l.contains("WARN")
            && l.contains("admin listener on a non-loopback address without a token")),
        "{err}"
    );
    // With a token, or on loopback: no warning.
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    for text in [
        exposed.replace(
            "listen = \"0.0.0.0:0\"",
            &format!("listen = \"0.0.0.0:0\"\ntoken_sha256 = \"{digest}\""),
        ),
        exposed.replace("0.0.0.0:0", "127.0.0.1:0"),
    ] {
        let (code, err, _) = tollgate_check(dir.path(), &text);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("admin listener"), "{text}\n{err}");
    }
    // Bad settings are errors naming file:line and key, never echoing a token.
    let bad = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"*.example\"]\ntoken_env = \"TOLLGATE_NO_SUCH_VAR\"\ntoken_sha256 = \"{digest}\"\ncolour = 1\n\n{api}",
        gateway_section("")
    );
    let (code, err, path) = tollgate_check(dir.path(), &bad);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{path}:10:")) && err.contains("key `colour`"),
        "{err}"
    );
    let bad = bad.replace("colour = 1\n", "");
    let (code, err, path) = tollgate_check(dir.path(), &bad);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{path}:7:")) && err.contains("key `admin.allowed_hosts[0]`"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{path}:9:"))
            && err.contains("key `admin.token_sha256`")
            && err.contains("not both"),
        "{err}"
    );
}
