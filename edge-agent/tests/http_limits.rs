//! The push endpoint's protections with a real agent process: beyond loopback it needs a
//! bearer token (and refuses to start without one), bodies over `http.max_frame_bytes`
//! get 413, connections over `http.max_connections` get 429; the probes stay open.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::Duration;

/// One HTTP/1.1 request with extra header lines: (status, body).
fn request(port: u16, method: &str, path: &str, headers: &[String], body: &[u8]) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    // The agent may answer (413) and close before taking the whole body.
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

const TOKEN: &str = "push-token-0123456789";

fn bearer(token: &str) -> Vec<String> {
    vec![format!("Authorization: Bearer {token}")]
}

#[test]
fn beyond_loopback_pushes_need_the_token_and_bodies_and_connections_are_bounded() {
    let f = fixture();
    let port = free_port();
    let spool = format!("spool.dir={:?}", p(&f.root.join("spool-http")));
    let listen = format!("http.listen=\"0.0.0.0:{port}\"");
    let base = [
        "run",
        "--bundle",
        p(&f.bundle),
        "--set",
        "device.id=cam-http",
        "--set",
        "mqtt.enabled=false",
        "--set",
        &spool,
        "--set",
        &listen,
    ];
    // Without a token the agent refuses to listen beyond loopback.
    let out = agent(&base);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("http.token"), "{err}");

    let mut args: Vec<&str> = base.to_vec();
    args.extend([
        "--set",
        "http.max_frame_bytes=200000",
        "--set",
        "http.max_connections=2",
    ]);
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-http.log"),
        &[("INSP_LOG", "info"), ("INSP_EDGE__HTTP__TOKEN", TOKEN)],
    );
    assert!(
        wait_until(60, || request(port, "GET", "/healthz", &[], b"").0 == 200),
        "the probes answer without a token:\n{}",
        agent.log()
    );
    let frame = std::fs::read(f.data.join("test/good/0000.png")).unwrap();
    assert!(frame.len() < 200_000);
    // No token, a wrong one: 401; the right one: scored.
    let (code, body) = request(port, "POST", "/v1/frames", &[], &frame);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    let (code, _) = request(
        port,
        "POST",
        "/v1/frames",
        &bearer("wrong-token-0000000000"),
        &frame,
    );
    assert_eq!(code, 401);
    assert_eq!(request(port, "GET", "/v1/status", &[], b"").0, 401);
    let (code, body) = request(port, "POST", "/v1/frames", &bearer(TOKEN), &frame);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("edge_band"), "{body}");
    // Over the body limit: 413 with the setting named.
    let big = vec![0u8; 300_000];
    let (code, body) = request(port, "POST", "/v1/frames", &bearer(TOKEN), &big);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("http.max_frame_bytes"), "{body}");
    // Two connections held open take every slot: the third gets 429 at once.
    // (A connection closing from the requests above may hold its slot a moment: two are
    // held once neither got an answer.)
    let quiet = |c: &mut std::net::TcpStream| {
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(c.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut)
    };
    let mut held = Vec::new();
    assert!(
        wait_until(10, || {
            held = (0..2)
                .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            held.iter_mut().all(quiet)
        }),
        "two connections are never both taken"
    );
    let (code, body) = request(port, "GET", "/healthz", &[], b"");
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("http.max_connections"), "{body}");
    drop(held);
    assert!(
        wait_until(10, || request(port, "GET", "/healthz", &[], b"").0 == 200),
        "slots come back when the connections close"
    );
    // Counted, and the metrics need the token too.
    let (code, metrics) = request(port, "GET", "/metrics", &bearer(TOKEN), b"");
    assert_eq!(code, 200);
    let count = |reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("insp_edge_http_refused_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("unauthorized"), 3.0, "{metrics}");
    assert_eq!(count("too_large"), 1.0, "{metrics}");
    assert!(count("too_many_connections") >= 1.0, "{metrics}");
    assert!(!agent.log().contains(TOKEN), "the token is never logged");
    assert!(agent.terminate());
}
