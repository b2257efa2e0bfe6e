//! The test consoles: the web page at `/console` driven in headless Chromium.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// The admin listener here requires a token: the page asks for it and sends it on its own
/// requests (`/apis`, `/console/probe`).
#[tokio::test]
async fn web_console_connects_sends_sees_the_echo_disconnects_and_shows_a_refusal() {
    let backend = RawBackend::start(echo_frames()).await;
    let judged_backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("console");
    plugins::install(
        &dir.path().join("plugins"),
        &["jwt_validate.wasm", "message_test.wasm"],
    );
    let text = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"CONSOLE_ADMIN_TOKEN\"\n\n{}{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("echo", "echo", &backend.url(), ""),
        api_section(
            "judged",
            "judged",
            &judged_backend.url(),
            "[[apis.on_message]]\nplugin = \"message-test\"\n"
        ),
        api_section(
            "locked",
            "locked",
            &backend.url(),
            "[[apis.on_handshake]]\nplugin = \"jwt-validate\"\n[apis.on_handshake.config]\nalgorithms = [\"HS256\"]\nquery_parameter_name = \"access_token\"\njwks = '{\"keys\": [{\"kty\": \"oct\", \"kid\": \"k\", \"k\": \"dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IG9mIGVub3VnaCBsZW5ndGg\"}]}'\n"
        )
    );
    let token = "console-admin-token-0123456789";
    let gw = Gateway::start_with_env(dir, &text, &[("CONSOLE_ADMIN_TOKEN", token)]);
    let admin = gw.admin.unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let artifacts = root.join("target").join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("web-console.png");
    let _ = std::fs::remove_file(&shot);
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} not found: install Debian's `chromium` package (scripts/test does, as root) or set CHROMIUM"
    );
    let script = root.join("tests").join("console").join("web-console.cjs");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(format!("http://{admin}"))
            .arg(&shot)
            .arg(token)
            .env(
                "NODE_PATH",
                root.join("target").join("browser").join("node_modules"),
            )
            .env("CHROMIUM", chromium)
            .output()
            .expect("run node (scripts/test installs playwright-core into target/browser)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.output()
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["askedForToken"], true, "{r}");
    assert!(
        r["received"]
            .as_str()
            .unwrap()
            .ends_with("\u{2190} hello from chromium"),
        "{r}"
    );
    assert!(
        r["receivedBinary"]
            .as_str()
            .unwrap()
            .ends_with("[binary 3 B] 01 ff 7e"),
        "{r}"
    );
    assert_eq!(r["closed"], "closed (1000 console disconnect)", "{r}");
    assert_eq!(r["refused"], "handshake refused: 401", "{r}");
    assert!(
        r["refusedLog"].as_str().unwrap().contains("HTTP 401"),
        "{r}"
    );
    // What the message policy did, told by the gateway (the browser alone would see only a
    // missing echo), each on the message it was about.
    let lines: Vec<&str> = r["gatewayLines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert_eq!(lines.len(), 3, "{r}");
    assert!(
        lines[0].ends_with("gateway: your message #2 (7 B) was dropped by message-test"),
        "{r}"
    );
    assert!(
        lines[1].ends_with(
            "gateway: your message #3 was replaced by message-test (11 B \u{2192} 11 B)"
        ),
        "{r}"
    );
    assert!(
        lines[2].ends_with(
            "gateway: message-test closed the connection on your message #4: 4000 no more"
        ),
        "{r}"
    );
    let marked: Vec<&str> = r["marked"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert_eq!(marked.len(), 3, "{r}");
    assert!(
        marked[0].starts_with("dropped: ") && marked[0].ends_with("drop me"),
        "{r}"
    );
    assert!(
        marked[1].starts_with("replaced: ") && marked[1].ends_with("upper:shout"),
        "{r}"
    );
    assert!(marked[2].starts_with("closed: "), "{r}");
    let echoed: Vec<&str> = r["judgedReceived"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(
        echoed.iter().any(|l| l.ends_with("\u{2190} UPPER:SHOUT"))
            && !echoed.iter().any(|l| l.contains("drop me")),
        "{r}"
    );
    assert_eq!(r["judgedClosed"], "closed (4000 no more)", "{r}");
    // The console's own subprotocol never reached the backend.
    assert!(
        !judged_backend
            .last_head()
            .to_ascii_lowercase()
            .contains("tollgate-console"),
        "{}",
        judged_backend.last_head()
    );
    assert!(artifacts.join("web-console.png").exists());

    // The browser's session went through the gateway like any client's.
    let ok = gw
        .wait_record("handshake", |h| h["api"] == "echo" && h["status"] == 101)
        .await;
    let closed = gw
        .wait_record("connection_closed", |c| c["conn"] == ok["conn"])
        .await;
    assert_eq!(closed["close_code"], 1000);
    assert_eq!(closed["client_messages"], 2);
    assert_eq!(
        backend.last_head().lines().next().unwrap_or_default(),
        "GET /?room=1 HTTP/1.1"
    );
}

/// `tollgate console` on a pseudo-terminal, as a person would use it.
struct Pty {
    child: std::process::Child,
    master: std::fs::File,
    seen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Pty {
    fn spawn(args: &[&str]) -> Pty {
        use std::os::fd::{FromRawFd, OwnedFd};
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two new descriptors into the given ints.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty failed");
        // SAFETY: both descriptors are fresh and owned here.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let child = Command::new(BIN)
            .arg("console")
            .args(args)
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave)
            .spawn()
            .unwrap();
        let master = std::fs::File::from(master);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        {
            let mut r = master.try_clone().unwrap();
            let seen = seen.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 4096];
                // Ends with EIO once the child has exited and no slave is open.
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    seen.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Pty {
            child,
            master,
            seen,
        }
    }

    fn type_line(&mut self, s: &str) {
        use std::io::Write;
        self.master.write_all(s.as_bytes()).unwrap();
        self.master.write_all(b"\n").unwrap();
    }

    async fn expect(&self, needle: &str) {
        for _ in 0..500 {
            if self.seen.lock().unwrap().contains(needle) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let shown = self.seen.lock().unwrap().clone();
        panic!("terminal never showed {needle:?}; it shows:\n{shown}");
    }

    async fn exit_code(&mut self) -> i32 {
        for _ in 0..500 {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let shown = self.seen.lock().unwrap().clone();
        panic!("console did not exit; it shows:\n{shown}");
    }
}

#[tokio::test]
async fn terminal_console_connects_sends_receives_and_closes_on_ctrl_d() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section(""),
        api_section("echo", "echo", &backend.url(), "")
    ));
    let url = gw.ws_url("/echo");
    let mut t = Pty::spawn(&[
        &url,
        "--header",
        "X-Console: yes",
        "--query",
        "room=7",
        "--subprotocol",
        "chat",
    ]);
    t.expect("* connected: 101 Switching Protocols, subprotocol chat")
        .await;
    t.type_line("hello there");
    t.expect("< hello there").await;
    t.type_line("/binary 01 ff 7e");
    t.expect("< [binary 3 B] 01 ff 7e").await;
    t.type_line("/ping are you there");
    t.expect("< [ping] are you there").await;
    t.type_line("/bogus");
    t.expect("unknown command /bogus").await;
    // Ctrl-D at the start of a line: end of input, a clean close.
    {
        use std::io::Write;
        t.master.write_all(&[4]).unwrap();
    }
    t.expect("> [close 1000 ]").await;
    t.expect("< [close 1000 ]").await;
    assert_eq!(t.exit_code().await, 0);
    let head = backend.last_head();
    assert_eq!(header(&head, "x-console").as_deref(), Some("yes"), "{head}");
    assert!(head.starts_with("GET /?room=7 HTTP/1.1"), "{head}");
    let closed = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(closed["closed_by"], "client");
    assert_eq!(closed["close_code"], 1000);

    // A refused handshake: its status, and exit code 1.
    let mut t = Pty::spawn(&[&gw.ws_url("/nowhere")]);
    t.expect("* handshake refused: 404 Not Found").await;
    assert_eq!(t.exit_code().await, 1);
}

/// The console's watch from outside, without a browser: a token from `/console/watch`, offered
/// as the only subprotocol, is answered (so a browser accepts the 101), never reaches the
/// backend, and `/console/events` then tells what a message rate dropped. A client that makes
/// up a token loses it from its offer and is watched by nobody.
#[tokio::test]
async fn the_console_watch_tells_what_a_message_rate_dropped() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        gateway_section(""),
        api_section(
            "echo",
            "echo",
            &backend.url(),
            "[[apis.message_limits]]\nmax_messages_per_second = 1\nburst_messages = 2\naction = \"drop\"\n"
        )
    ));
    let admin = gw.admin.unwrap();
    let (status, _, body) = http_get(admin, "/console/watch").await;
    assert_eq!(status, 200, "{body}");
    let issued: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (watch, protocol) = (
        issued["watch"].as_str().unwrap(),
        issued["protocol"].as_str().unwrap(),
    );
    assert_eq!(protocol, format!("tollgate-console.{watch}"));
    let (head, mut ws) = raw_handshake(
        gw.ws.unwrap(),
        "/echo",
        &format!("Sec-WebSocket-Protocol: {protocol}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("sec-websocket-protocol: {protocol}")),
        "{head}"
    );
    assert!(
        !backend
            .last_head()
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol"),
        "{}",
        backend.last_head()
    );
    // Four in one write: two pass (the burst), two are dropped.
    let frames: Vec<u8> = ["a", "b", "c", "d"]
        .iter()
        .flat_map(|t| encode_frame(true, 0, 1, t.as_bytes(), Some([1, 2, 3, 4])))
        .collect();
    ws.send_raw(&frames).await.unwrap();
    for want in ["a", "b"] {
        let f = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.payload, want.as_bytes());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let events = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no event on the watch within 5 s"
        );
        let (status, _, body) = http_get(admin, &format!("/console/events?watch={watch}")).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if !v["events"].as_array().unwrap().is_empty() {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(events["watched"], true, "{events}");
    let e = &events["events"][0];
    assert_eq!(
        (
            &e["sender"],
            &e["happened"],
            &e["by"],
            &e["count"],
            &e["seq"]
        ),
        (
            &serde_json::json!("client"),
            &serde_json::json!("over_rate"),
            &serde_json::json!("max_messages_per_second"),
            &serde_json::json!(2),
            &serde_json::json!(1)
        ),
        "{events}"
    );
    let (_, _, after) = http_get(admin, &format!("/console/events?watch={watch}&after=1")).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&after).unwrap()["events"],
        serde_json::json!([])
    );
    // A made-up token: taken out of the offer (the other subprotocol goes on), nothing echoed,
    // and no watch to read.
    let (head, _ws) = raw_handshake(
        gw.ws.unwrap(),
        "/echo",
        "Sec-WebSocket-Protocol: tollgate-console.feedfacefeedfacefeedfacefeedface, chat\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("tollgate-console"),
        "{head}"
    );
    let sent = backend.last_head().to_ascii_lowercase();
    assert!(sent.contains("sec-websocket-protocol: chat\r\n"), "{sent}");
    let (status, _, _) = http_get(
        admin,
        "/console/events?watch=feedfacefeedfacefeedfacefeedface",
    )
    .await;
    assert_eq!(status, 404);
}
