//! The review pages in a real browser: Debian's Chromium driven through chromedriver
//! (WebDriver JSON over HTTP), against a hub process on PostgreSQL with escalations from a
//! device on its embedded broker. An operator signs in, opens the queue and an item, labels
//! it with the key `g`; the label lands in the database and the audit trail as that user.
//! A viewer sees the queue, but the label buttons are disabled and say why, and the key
//! records nothing; the operator takes her label back; a source with markup shows as text; a POST without the session's CSRF token is refused; an idle session
//! is signed out. The fleet page lists every device with its online state (one said
//! offline), sorts, and shows a device named `<script>alert(1)</script>` as text, as the
//! frame search does; a device page plots; the CSV export of 10,000 frames is complete.
//! Screenshots of each page go to the test output folder
//! (`target/tmp/browser-screenshots/`).

mod common;

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The W3C WebDriver element key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn which(name: &str, env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: scripts/test.sh installs Debian's chromium and chromium-driver (or set {env})");
}

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser session.
struct Browser {
    http: reqwest::Client,
    base: String,
    shots: PathBuf,
}

impl Browser {
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut r = self.http.request(method, &url);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .json()
            .await
            .unwrap();
        if let Some(err) = v["value"].get("error") {
            panic!("WebDriver {path}: {err} {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": js, "args": [] })),
        )
        .await
    }

    async fn key(&self, key: &str) {
        self.cmd(
            reqwest::Method::POST,
            "/actions",
            Some(
                json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": [
                    { "type": "keyDown", "value": key }, { "type": "keyUp", "value": key }
                ]}]}),
            ),
        )
        .await;
    }

    async fn wait_for(&self, what: &str, js: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.script(js).await;
            if !v.is_null() && v != json!(false) {
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what} at {}",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let b64 = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(&self.shots).unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    async fn sign_in(&self, hub: &str, user: &str, password: &str) {
        self.goto(&format!("{hub}/review")).await;
        assert!(self.url().await.contains("/login"), "{}", self.url().await);
        self.type_into("#user", user).await;
        self.type_into("#password", password).await;
        self.click("#sign-in").await;
        self.wait_for(
            "the queue",
            "return document.getElementById('queue-rows') !== null",
        )
        .await;
    }
}

async fn start_browser(driver: &Driver, profile: &Path, shots: PathBuf) -> Browser {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let chromium = which("chromium", "CHROMIUM");
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1366,768", format!("--user-data-dir={}", profile.display())]
        }
    }}});
    let v: Value = http
        .post(format!("{}/session", driver.url))
        .json(&caps)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = v["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("chromedriver could not start Chromium: {v}"))
        .to_string();
    Browser {
        http,
        base: format!("{}/session/{id}", driver.url),
        shots,
    }
}

/// A chromedriver on a free port, once it answers.
async fn start_driver(driver_bin: &Path) -> Driver {
    let dport = free_port();
    let child = Command::new(driver_bin)
        .arg(format!("--port={dport}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{dport}"),
    };
    let t0 = Instant::now();
    while reqwest::get(format!("{}/status", driver.url))
        .await
        .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    driver
}

fn add_user(db: &str, name: &str, role: &str, password: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .args([
            "users",
            "add",
            name,
            "--role",
            role,
            "--password-stdin",
            "--database-url",
            db,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_labels_with_a_key_and_a_viewer_cannot() {
    let driver_bin = which("chromedriver", "CHROMEDRIVER");
    let pg = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: Some(&pg.url),
        client_id: "hub-web",
        group: "hubs",
        site: "plant-w",
    });
    let mut dev = Device::connect(("127.0.0.1", port), "plant-w", "cam-1").await;
    let f = fixture();
    let mut frames = Vec::new();
    for image in [defect_image(), f.images[0].as_path()] {
        let (id, _) = dev.escalate(image).await;
        assert_eq!(dev.verdict(60).await.frame_id, id);
        frames.push(id);
    }
    // A source with markup (an edge may send any text without control characters).
    const HOSTILE: &str = "<script>alert(1)</script><img src=x onerror=alert(2)>";
    let (bytes, score, map, version) = edge_score(&f.images[1]);
    let hostile_id = uuid::Uuid::new_v4().to_string();
    let mut r = dev.result(
        &hostile_id,
        score,
        insp_proto::v1::Band::Uncertain,
        &version,
    );
    r.source = HOSTILE.into();
    let e = insp_proto::v1::Escalation {
        result: Some(r),
        frame: bytes,
        frame_format: "png".into(),
        edge_map: Some(map),
        search: Some(insp_proto::v1::BankSearch::lists(EDGE_PROBES)),
        delivery: None,
    };
    dev.publish(
        insp_proto::TopicKind::Escalation,
        insp_proto::Message::encode_to_vec(&e),
    )
    .await;
    assert_eq!(dev.verdict(60).await.frame_id, hostile_id);
    frames.push(hostile_id.clone());
    dev.close().await;
    add_user(&pg.url, "ana", "operator", "ana-password-1");
    add_user(&pg.url, "vic", "viewer", "vic-password-1");

    let driver = start_driver(&driver_bin).await;
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-screenshots");
    let site = format!("http://127.0.0.1:{}", hub.http);

    // The operator: a wrong password first, then the queue, an item, the key g.
    let b = start_browser(&driver, &dir.path().join("profile-ana"), shots.clone()).await;
    b.goto(&format!("{site}/login")).await;
    b.type_into("#user", "ana").await;
    b.type_into("#password", "not-her-password").await;
    b.click("#sign-in").await;
    let refused = b
        .wait_for(
            "the refusal",
            "const e = document.querySelector('.error'); return e && e.textContent",
        )
        .await;
    assert_eq!(refused, json!("wrong user name or password"));
    b.screenshot("login-refused").await;
    b.sign_in(&site, "ana", "ana-password-1").await;
    let listed = b
        .script("return document.querySelectorAll('#queue-rows tr[data-frame]').length")
        .await;
    assert_eq!(listed, json!(3));
    // The hostile source is text on the page, not markup: no script ran, no element made.
    let shown = b
        .script("return document.getElementById('queue-rows').textContent")
        .await;
    assert!(shown.as_str().unwrap().contains(HOSTILE), "{shown}");
    assert_eq!(
        b.script("return document.querySelectorAll('#queue-rows script, #queue-rows img').length")
            .await,
        json!(0)
    );
    let alert = b
        .http
        .get(format!("{}/alert/text", b.base))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(alert["value"]["error"], json!("no such alert"), "{alert}");
    b.screenshot("queue").await;
    let order = b
        .script("return [...document.querySelectorAll('#queue-rows tr[data-frame]')].map(r => r.dataset.frame)")
        .await;
    let order: Vec<String> = serde_json::from_value(order).unwrap();
    let first = order[0].clone();
    assert!(frames.contains(&first), "{first}");
    b.click("#queue-rows a.open").await;
    b.wait_for(
        "the frame and its heatmap",
        "const f = document.getElementById('frame'), o = document.getElementById('overlay'); \
         return f && f.complete && f.naturalWidth > 0 && o && o.complete && o.naturalWidth > 0",
    )
    .await;
    b.screenshot("item").await;
    b.key("g").await;
    let pool = pool(&pg.url).await;
    let t0 = Instant::now();
    let (operator, label) = loop {
        let row = sqlx::query("SELECT operator, label FROM reviews WHERE frame_id = $1")
            .bind(first.clone())
            .fetch_optional(&pool)
            .await
            .unwrap();
        if let Some(r) = row {
            break (
                sqlx::Row::get::<String, _>(&r, 0),
                sqlx::Row::get::<String, _>(&r, 1),
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no label in the database after pressing g"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((operator.as_str(), label.as_str()), ("ana", "good"));
    let (actor, details): (String, String) = sqlx::query(
        "SELECT actor, details FROM audit WHERE action = 'review.label' ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .map(|r| (sqlx::Row::get(&r, 0), sqlx::Row::get(&r, 1)))
    .unwrap();
    assert_eq!(actor, "ana");
    assert!(
        details.contains(&first) && details.contains("\"good\""),
        "{details}"
    );
    // After the label the page moved on to the next waiting frame of the queue.
    let other = order[1].clone();
    b.wait_for(
        "the next item",
        &format!("return window.location.pathname === '/review/{other}'"),
    )
    .await;

    // The viewer: sees the queue, the buttons say why they are disabled, g does nothing.
    let v = start_browser(&driver, &dir.path().join("profile-vic"), shots.clone()).await;
    v.sign_in(&site, "vic", "vic-password-1").await;
    assert_eq!(
        v.script("return document.querySelectorAll('#queue-rows tr[data-frame]').length")
            .await,
        json!(2)
    );
    v.goto(&format!("{site}/review/{other}")).await;
    let why = v
        .wait_for(
            "the disabled button",
            "const b = document.getElementById('label-good'); return b && b.disabled && b.title",
        )
        .await;
    assert!(why.as_str().unwrap().contains("operator role"), "{why}");
    v.screenshot("item-viewer").await;
    v.key("g").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        count(&pool, "reviews").await,
        1,
        "the viewer's key recorded nothing"
    );

    // A POST without the session's CSRF token is refused, even with the session cookie.
    let cookie = b
        .cmd(reqwest::Method::GET, "/cookie/insp_session", None)
        .await;
    let cookie = format!("insp_session={}", cookie["value"].as_str().unwrap());
    let forged = reqwest::Client::new()
        .post(format!("{site}/review/{other}/label"))
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("label=defect&csrf=0000")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 403);
    assert!(forged.text().await.unwrap().contains("security token"));
    assert_eq!(
        count(&pool, "reviews").await,
        1,
        "the forged POST recorded nothing"
    );
    // An idle session is signed out.
    sqlx::query("UPDATE sessions SET last_seen_unix_ms = 0 WHERE user_name = 'vic'")
        .execute(&pool)
        .await
        .unwrap();
    v.goto(&format!("{site}/review")).await;
    assert!(v.url().await.contains("/login?next="), "{}", v.url().await);
    let left: i64 = sqlx::query("SELECT COUNT(*) FROM sessions WHERE user_name = 'vic'")
        .fetch_one(&pool)
        .await
        .map(|r| sqlx::Row::get(&r, 0))
        .unwrap();
    assert_eq!(left, 0, "the idle session is deleted");

    // The operator takes her label back: gone from the database, in the audit trail.
    b.goto(&format!("{site}/review/{first}")).await;
    b.click("#undo").await;
    b.wait_for(
        "the item without the label",
        "return document.getElementById('undo') === null && document.getElementById('labels') !== null",
    )
    .await;
    assert_eq!(count(&pool, "reviews").await, 0);
    let last: String =
        sqlx::query("SELECT action FROM audit WHERE actor = 'ana' ORDER BY seq DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .map(|r| sqlx::Row::get(&r, 0))
            .unwrap();
    assert_eq!(last, "review.undo");
    pool.close().await;
}

/// CSV records in `text`: line ends outside quoted fields.
fn csv_records(text: &str) -> usize {
    let mut quoted = false;
    let mut records = 0;
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            '\n' if !quoted => records += 1,
            _ => {}
        }
    }
    records
}

/// The device's state message (`offline`: its last will's kind) of the connection that
/// began at `connected`.
fn state(dev: &Device, offline: bool, connected: i64) -> Vec<u8> {
    use insp_proto::v1::device_state::Status;
    insp_proto::Message::encode_to_vec(&insp_proto::v1::DeviceState {
        device: dev.name.clone(),
        status: if offline {
            Status::Offline
        } else {
            Status::Online
        } as i32,
        model_version: "v-test".into(),
        since_unix_ms: now_ms(),
        agent_version: "agent-9.9".into(),
        connected_unix_ms: connected,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_and_frame_pages_show_every_device_as_text_and_export_every_frame() {
    const HOSTILE: &str = "<script>alert(1)</script>";
    let driver_bin = which("chromedriver", "CHROMEDRIVER");
    let pg = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: Some(&pg.url),
        client_id: "hub-fleet",
        group: "hubs",
        site: "plant-f",
    });
    // Two devices come online; cam-2 then says it is offline (as its last will would).
    let mut cam1 = Device::connect(("127.0.0.1", port), "plant-f", "cam-1").await;
    let cam2 = Device::connect(("127.0.0.1", port), "plant-f", "cam-2").await;
    let connected = now_ms();
    cam1.publish(insp_proto::TopicKind::State, state(&cam1, false, connected))
        .await;
    cam2.publish(insp_proto::TopicKind::State, state(&cam2, false, connected))
        .await;
    // cam-1 sends results (scores 1.0 .. 2.9) and one escalation that the hub decides.
    for i in 0..20 {
        let r = cam1.result(
            &uuid::Uuid::new_v4().to_string(),
            1.0 + i as f32 / 10.0,
            insp_proto::v1::Band::Ok,
            "v-test",
        );
        cam1.publish_result(&r).await;
    }
    // Its metrics: a spool backlog and verdict counters since its start.
    cam1.publish(
        insp_proto::TopicKind::Metrics,
        insp_proto::Message::encode_to_vec(&insp_proto::v1::DeviceMetrics {
            device: "cam-1".into(),
            sent_unix_ms: now_ms(),
            spool_results: 3,
            spool_escalations: 1,
            verdict_fallbacks: 6,
            late_verdicts: 2,
            alarms: vec![insp_proto::v1::Alarm {
                kind: "frozen".into(),
                since_unix_ms: now_ms(),
                detail: String::new(),
            }],
            ..Default::default()
        }),
    )
    .await;
    let (escalated, _) = cam1.escalate(defect_image()).await;
    assert_eq!(cam1.verdict(60).await.frame_id, escalated);
    cam2.publish(insp_proto::TopicKind::State, state(&cam2, true, connected))
        .await;
    cam2.close().await;
    let pool = pool(&pg.url).await;
    eventually(30, "cam-1 online with 21 frames, cam-2 offline", || {
        let pool = pool.clone();
        async move {
            let rows: Vec<(String, String, i64)> = sqlx::query(
                "SELECT device, status, frames FROM devices WHERE site = 'plant-f' ORDER BY device",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    sqlx::Row::get(r, 0),
                    sqlx::Row::get(r, 1),
                    sqlx::Row::get(r, 2),
                )
            })
            .collect();
            rows == vec![
                ("cam-1".to_string(), "online".to_string(), 21),
                ("cam-2".to_string(), "offline".to_string(), 0),
            ]
        }
    })
    .await;
    // A device whose name is markup (not a valid MQTT topic level, so written into the
    // database directly) with 10,000 frames, their sources with commas, quotes and line
    // breaks.
    let now = now_ms();
    sqlx::query(
        "INSERT INTO devices (site, device, status, first_seen_unix_ms, last_seen_unix_ms, state_since_unix_ms) \
         VALUES ('plant-f', $1, 'online', $2, $2, $2)",
    )
    .bind(HOSTILE)
    .bind(now)
    .execute(&pool)
    .await
    .unwrap();
    let t0 = Instant::now();
    sqlx::query(
        "INSERT INTO frames (frame_id, site, device, source, captured_unix_ms, scored_unix_ms, \
         received_unix_ms, stored_unix_ms, edge_score, band, model_version, latency_ms) \
         SELECT 'bulk-' || lpad(g::text, 5, '0'), 'plant-f', $1, \
         'line/' || g || ', \"quoted\"' || CASE WHEN g % 7 = 0 THEN E'\\nsecond line' ELSE '' END, \
         $2 - g * 1000, $2 - g * 1000, $2, $2, 0.5 + (g % 100) / 50.0, \
         CASE WHEN g % 10 = 0 THEN 'NG' ELSE 'OK' END, 'v-bulk', 5.0 FROM generate_series(1, 10000) g",
    )
    .bind(HOSTILE)
    .bind(now)
    .execute(&pool)
    .await
    .unwrap();
    eprintln!("10,000 frames inserted in {:?}", t0.elapsed());
    add_user(&pg.url, "vic", "viewer", "vic-password-1");

    let driver = start_driver(&driver_bin).await;
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-screenshots");
    let site = format!("http://127.0.0.1:{}", hub.http);
    let b = start_browser(&driver, &dir.path().join("profile-vic"), shots.clone()).await;
    b.sign_in(&site, "vic", "vic-password-1").await;
    b.click("header nav a[href='/fleet']").await;
    b.wait_for(
        "the fleet table",
        "return document.getElementById('fleet-rows') !== null",
    )
    .await;
    let states = b
        .script("return [...document.querySelectorAll('#fleet-rows tr[data-device]')].map(r => [r.dataset.device, r.dataset.status])")
        .await;
    assert_eq!(
        states,
        json!([
            ["plant-f/<script>alert(1)</script>", "online"],
            ["plant-f/cam-1", "online"],
            ["plant-f/cam-2", "offline"]
        ])
    );
    let shown = b
        .script("return document.getElementById('fleet-rows').textContent")
        .await;
    assert!(shown.as_str().unwrap().contains(HOSTILE), "{shown}");
    assert!(shown.as_str().unwrap().contains("agent-9.9"), "{shown}");
    assert_eq!(
        b.script("return document.querySelectorAll('#fleet-rows script').length")
            .await,
        json!(0)
    );
    // cam-1's rate and median come from the per-minute aggregates: 21 frames, its 20
    // results scored 1.0 .. 2.9 (median about 2).
    let cells = b
        .script("return [...document.querySelectorAll('#fleet-rows tr[data-device=\"plant-f/cam-1\"] td')].map(c => c.textContent)")
        .await;
    let cells: Vec<String> = serde_json::from_value(cells).unwrap();
    let median: f64 = cells[5].parse().unwrap_or_else(|_| panic!("{cells:?}"));
    assert!((1.6..2.5).contains(&median), "{cells:?}");
    assert!(cells[4].ends_with('%') && cells[4] != "0.0 %", "{cells:?}");
    // Spool backlog and the verdict counters from its metrics (one message: no rise yet,
    // the totals since the agent started on hover).
    assert_eq!(
        (cells[7].as_str(), cells[8].as_str(), cells[9].as_str()),
        ("4", "0", "0"),
        "{cells:?}"
    );
    assert_eq!(
        b.script("return document.querySelector('#fleet-rows tr[data-device=\"plant-f/cam-1\"] td:nth-child(9) span').title")
            .await,
        json!("6 since the agent started")
    );
    // Its active camera alarm, next to its state.
    assert!(cells[1].contains("frozen"), "{cells:?}");
    b.screenshot("fleet").await;
    // Sorted by frames per second, most first: cam-1 leads.
    b.click("#sort-fps").await;
    b.click("#sort-fps").await;
    let first = b
        .wait_for(
            "the sorted table",
            "return window.location.search.includes('order=desc') && document.querySelector('#fleet-rows tr').dataset.device",
        )
        .await;
    assert_eq!(first, json!("plant-f/cam-1"));
    // An unknown column is refused with the list of columns.
    b.goto(&format!(
        "{site}/fleet?sort=frames%3B%20DROP%20TABLE%20devices"
    ))
    .await;
    let refused = b
        .wait_for(
            "the refusal",
            "const e = document.querySelector('.error'); return e && e.textContent",
        )
        .await;
    assert!(
        refused.as_str().unwrap().contains("use one of device"),
        "{refused}"
    );

    // cam-1's page: the plots, its latest frames, the escalated one linked to its review.
    b.goto(&format!("{site}/fleet")).await;
    b.click("#fleet-rows tr[data-device='plant-f/cam-1'] a")
        .await;
    b.wait_for(
        "the device's plots",
        "return document.querySelectorAll('svg.chart').length === 5",
    )
    .await;
    assert_eq!(
        b.script("return document.querySelectorAll('#device-frames tr[data-frame]').length")
            .await,
        json!(20)
    );
    assert_eq!(
        b.script(&format!("return document.querySelectorAll('#device-frames a[href=\"/review/{escalated}\"]').length"))
            .await,
        json!(1)
    );
    let alarms = b
        .script("return document.getElementById('alarms').textContent")
        .await;
    assert!(
        alarms.as_str().unwrap().starts_with("frozen since"),
        "{alarms}"
    );
    b.screenshot("device").await;
    // The markup device's page, reached by its link: its name as text, its frames.
    b.goto(&format!("{site}/fleet")).await;
    b.click("#fleet-rows tr[data-device='plant-f/<script>alert(1)</script>'] a")
        .await;
    let name = b
        .wait_for(
            "the markup device's page",
            "const e = document.getElementById('device-name'); return e && e.textContent",
        )
        .await;
    assert_eq!(name, json!(format!("plant-f/{HOSTILE}")));
    assert_eq!(
        b.script("return document.querySelectorAll('#device-frames tr[data-frame]').length")
            .await,
        json!(20)
    );
    assert_eq!(
        b.script("return document.querySelectorAll('main script').length")
            .await,
        json!(0)
    );

    // The frame search: the markup device's frames, a page of 100, its name as text.
    b.goto(&format!("{site}/frames")).await;
    b.type_into("#search-device", HOSTILE).await;
    b.click("#frame-search button").await;
    b.wait_for(
        "the search results",
        "return window.location.search.includes('device=') && document.getElementById('frame-rows') !== null",
    )
    .await;
    assert_eq!(
        b.script("return document.querySelectorAll('#frame-rows tr[data-frame]').length")
            .await,
        json!(100)
    );
    let shown = b
        .script("return document.getElementById('frame-rows').textContent")
        .await;
    assert!(shown.as_str().unwrap().contains(HOSTILE), "{shown}");
    assert_eq!(
        b.script("return document.querySelectorAll('#frame-rows script').length")
            .await,
        json!(0)
    );
    let alert = b
        .http
        .get(format!("{}/alert/text", b.base))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(alert["value"]["error"], json!("no such alert"), "{alert}");
    b.screenshot("frames").await;
    b.click("#next").await;
    b.wait_for(
        "the second page",
        "return window.location.search.includes('page=2') && document.querySelectorAll('#frame-rows tr[data-frame]').length === 100",
    )
    .await;
    // A bad value is a message, not an error of the hub.
    b.goto(&format!("{site}/frames?band=MAYBE&from=yesterday"))
        .await;
    let why = b
        .wait_for(
            "the message",
            "const e = document.getElementById('search-error'); return e && e.textContent",
        )
        .await;
    assert!(
        why.as_str().unwrap().contains("band \"MAYBE\"")
            && why.as_str().unwrap().contains("\"yesterday\""),
        "{why}"
    );

    // The CSV export of the markup device's 10,000 frames, with the viewer's session.
    let csv_link = b
        .script("return document.getElementById('csv') && document.getElementById('csv').href")
        .await;
    assert_eq!(
        csv_link,
        json!(null),
        "no export link while the search is refused"
    );
    let cookie = b
        .cmd(reqwest::Method::GET, "/cookie/insp_session", None)
        .await;
    let cookie = format!("insp_session={}", cookie["value"].as_str().unwrap());
    let t0 = Instant::now();
    let r = reqwest::Client::new()
        .get(format!(
            "{site}/frames.csv?device=%3Cscript%3Ealert%281%29%3C%2Fscript%3E"
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        disposition.starts_with("attachment; filename=\"frames-")
            && disposition.ends_with(".csv\""),
        "{disposition}"
    );
    assert!(
        r.headers().get("content-length").is_none(),
        "streamed, not sized in advance"
    );
    let text = r.text().await.unwrap();
    eprintln!(
        "CSV of 10,000 frames: {} bytes in {:?}",
        text.len(),
        t0.elapsed()
    );
    assert_eq!(csv_records(&text), 10_001, "a header and every frame");
    assert!(text.contains("\"line/7, \"\"quoted\"\"\nsecond line\""));
    assert_eq!(text.matches("bulk-").count(), 10_000);
    // Without a filter: every frame the hub stores.
    let all = reqwest::Client::new()
        .get(format!("{site}/frames.csv"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(csv_records(&all), 10_001 + 21);
    // Without a session: sent to sign in, no data.
    let anonymous = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{site}/frames.csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 303);
    cam1.close().await;
    pool.close().await;
}
