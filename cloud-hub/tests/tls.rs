//! TLS on the hub's own connections, with certificates made by the project's own
//! `cloud-hub pki` commands: the gRPC API over TLS with a token works through the
//! `cloud-hub` client (by address and by host name); a plaintext client, a client
//! trusting another CA and an https:// client without a CA are refused with a clear
//! error; the review pages sign in over HTTPS and the session cookie is `Secure`; with
//! `client_ca_file` the API refuses a client without a certificate and serves one with
//! a certificate of the CA, which without a token authenticates as the user of its
//! common name (refused while there is no such user). Then the hub's migrations run on a PostgreSQL cluster of the
//! test's own with `ssl = on` through `sslmode=verify-full`, the session is encrypted,
//! and a wrong CA is refused. Last, the embedded broker beyond loopback: refused without
//! TLS and logins; with them, plaintext clients and wrong passwords are refused, and a
//! device logged in over TLS has its result stored by a hub that came in the same way.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn hub_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cloud-hub"));
    c.env("USER", "tester")
        .env_remove("HUB_TOKEN")
        .env_remove("HUB_TOKEN_FILE")
        .env_remove("HUB_CA_FILE")
        .env_remove("HUB_CLIENT_CERT")
        .env_remove("HUB_CLIENT_KEY")
        .env_remove("HUB_USER_PASSWORD");
    c
}

fn run(args: &[&str], envs: &[(&str, &Path)], stdin: &str) -> Output {
    let mut child = hub_bin()
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cloud-hub runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn failed(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A CA folder (`pki init`) with a server certificate for 127.0.0.1 and localhost
/// (`pki server NAME`): (the CA's folder, the server certificate's folder).
fn ca_with_server(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let pki = dir.join(format!("pki-{name}"));
    let p = pki.to_str().unwrap();
    ok(
        &run(&["pki", "init", "--pki", p, "--name", name], &[], ""),
        "pki init",
    );
    ok(
        &run(
            &[
                "pki",
                "server",
                name,
                "--host",
                "127.0.0.1",
                "--host",
                "localhost",
                "--pki",
                p,
            ],
            &[],
            "",
        ),
        "pki server",
    );
    let server = pki.join("servers").join(name);
    assert!(server.join("server.pem").is_file() && server.join("server.key").is_file());
    (pki, server)
}

/// A hub process with a config of its own (no models: the API alone), killed on drop.
struct Hub {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    data: PathBuf,
    grpc: u16,
    http: u16,
}

impl Hub {
    fn start(dir: &Path, tls: &str) -> Hub {
        let broker = format!("listen = \"127.0.0.1:{}\"\n", free_port());
        Hub::configured(dir, &broker, "", tls)
    }

    /// A hub whose `[embedded_broker]` table holds `broker`, `[mqtt]` also `mqtt`, and
    /// `rest` follows the `[api]` table.
    fn configured(dir: &Path, broker: &str, mqtt: &str, rest: &str) -> Hub {
        let (grpc, http) = (free_port(), free_port());
        let data = dir.join("data");
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\n[embedded_broker]\n{broker}\
                 [mqtt]\nclient_id = \"hub-tls\"\n{mqtt}\
                 [api]\ngrpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\n{rest}"
            ),
        )
        .unwrap();
        let mut hub = Hub {
            child: None,
            config,
            log: dir.join("hub.log"),
            data,
            grpc,
            http,
        };
        hub.spawn();
        hub
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let before = self.log_text().matches("hub up:").count();
        self.child = Some(
            hub_bin()
                .args(["serve", "--config"])
                .arg(&self.config)
                .env("INSP_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("cloud-hub serve starts"),
        );
        let t0 = Instant::now();
        while self.log_text().matches("hub up:").count() == before {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("cloud-hub exited ({status}):\n{}", self.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "hub not up within 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn token_file(&self) -> PathBuf {
        self.data.join("admin.token")
    }

    fn database(&self) -> String {
        format!("sqlite://{}", self.data.join("hub.db").display())
    }

    /// `cloud-hub devices --api API` with the admin token and `envs`.
    fn devices(&self, api: &str, envs: &[(&str, &Path)]) -> Output {
        let mut all = vec![("HUB_TOKEN_FILE", self.token_file())];
        all.extend(envs.iter().map(|(k, v)| (*k, v.to_path_buf())));
        let refs: Vec<(&str, &Path)> = all.iter().map(|(k, v)| (*k, v.as_path())).collect();
        run(&["devices", "--api", api], &refs, "")
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- hub log ---\n{}", self.log_text());
        }
    }
}

fn https_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The value of cookie `name` among `Set-Cookie` headers, with the whole header.
fn set_cookie(r: &reqwest::Response, name: &str) -> (String, String) {
    r.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let value = v.strip_prefix(&format!("{name}="))?.split(';').next()?;
            Some((value.to_string(), v.to_string()))
        })
        .unwrap_or_else(|| panic!("no Set-Cookie {name}: {:?}", r.headers()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_review_pages_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, server) = ca_with_server(dir.path(), "hub-api");
    let (other_pki, _) = ca_with_server(dir.path(), "other");
    let ca = pki.join("ca.pem");
    let wrong_ca = other_pki.join("ca.pem");
    let tls = format!(
        "[api.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        server.join("server.pem"),
        server.join("server.key")
    );
    let mut hub = Hub::start(dir.path(), &tls);
    assert!(
        hub.log_text().contains("both over TLS"),
        "{}",
        hub.log_text()
    );
    let by_ip = format!("https://127.0.0.1:{}", hub.grpc);
    let by_name = format!("https://localhost:{}", hub.grpc);

    // The CLI over TLS with a token, by address and by host name (both in the SANs).
    for api in [&by_ip, &by_name] {
        let out = hub.devices(api, &[("HUB_CA_FILE", &ca)]);
        ok(&out, &format!("devices over {api}"));
    }
    // A plaintext client to the TLS listener.
    let plain = format!("http://127.0.0.1:{}", hub.grpc);
    let e = failed(&hub.devices(&plain, &[]), "a plaintext client");
    assert!(
        e.contains("https://") && e.contains("--ca-file"),
        "the refusal says what to do: {e}"
    );
    // A client that trusts another CA.
    let e = failed(
        &hub.devices(&by_ip, &[("HUB_CA_FILE", &wrong_ca)]),
        "a client trusting the wrong CA",
    );
    assert!(
        e.contains("certificate") && e.contains("--ca-file"),
        "the refusal names the certificate: {e}"
    );
    // https:// without any CA.
    let e = failed(&hub.devices(&by_ip, &[]), "https without a CA file");
    assert!(e.contains("--ca-file or HUB_CA_FILE"), "{e}");
    // A CA file that is not one.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let e = failed(&hub.devices(&by_ip, &[("HUB_CA_FILE", &junk)]), "a junk CA");
    assert!(e.contains("not a PEM certificate"), "{e}");
    // The handshakes refused above are logged by the hub, which keeps serving.
    assert!(
        hub.log_text().contains("TLS handshake with"),
        "{}",
        hub.log_text()
    );
    ok(
        &hub.devices(&by_ip, &[("HUB_CA_FILE", &ca)]),
        "devices after refusals",
    );

    // The HTTP listener over HTTPS: health, then signing in; the cookies are Secure.
    let web = format!("https://127.0.0.1:{}", hub.http);
    let client = https_client(&ca);
    let r = client.get(format!("{web}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok\n");
    let wrong = https_client(&wrong_ca)
        .get(format!("{web}/healthz"))
        .send()
        .await;
    let e = format!(
        "{:?}",
        wrong.expect_err("a client of another CA is refused")
    );
    assert!(
        e.contains("UnknownIssuer") || e.contains("certificate"),
        "{e}"
    );

    ok(
        &run(
            &[
                "users",
                "add",
                "olga",
                "--role",
                "operator",
                "--password-stdin",
                "--database-url",
                &hub.database(),
            ],
            &[],
            "correct horse battery\n",
        ),
        "users add",
    );
    let form = client.get(format!("{web}/login")).send().await.unwrap();
    assert_eq!(form.status(), 200);
    let (csrf, header) = set_cookie(&form, "insp_login_csrf");
    assert!(header.contains("; Secure"), "{header}");
    let r = client
        .post(format!("{web}/login"))
        .header(reqwest::header::COOKIE, format!("insp_login_csrf={csrf}"))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(format!(
            "user=olga&password=correct+horse+battery&csrf={csrf}&next=%2Freview"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "{:?}", r.text().await);
    let (session, header) = set_cookie(&r, "insp_session");
    assert!(
        header.contains("; Secure") && header.contains("HttpOnly"),
        "{header}"
    );
    let page = client
        .get(format!("{web}/review"))
        .header(reqwest::header::COOKIE, format!("insp_session={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("olga"));

    // Client certificates on the API: required once client_ca_file is set.
    ok(
        &run(
            &["pki", "hub", "ops-laptop", "--pki", pki.to_str().unwrap()],
            &[],
            "",
        ),
        "pki hub",
    );
    let client_dir = pki.join("hubs").join("ops-laptop");
    hub.stop();
    let text = std::fs::read_to_string(&hub.config).unwrap();
    std::fs::write(
        &hub.config,
        format!("{text}client_ca_file = {:?}\n", pki.join("ca.pem")),
    )
    .unwrap();
    hub.spawn();
    assert!(hub.log_text().contains("gRPC requires client certificates"));
    let e = failed(
        &hub.devices(&by_ip, &[("HUB_CA_FILE", &ca)]),
        "a client without a certificate",
    );
    assert!(
        e.contains("--cert-file"),
        "the refusal says what to do: {e}"
    );
    ok(
        &hub.devices(
            &by_ip,
            &[
                ("HUB_CA_FILE", &ca),
                ("HUB_CLIENT_CERT", &client_dir.join("hub.pem")),
                ("HUB_CLIENT_KEY", &client_dir.join("hub.key")),
            ],
        ),
        "devices with a client certificate",
    );
    // Without a token, the certificate's common name is the user: refused while no
    // user has that name, served once one does.
    let empty = dir.path().join("no-token-here");
    std::fs::create_dir_all(&empty).unwrap();
    let cert_only = |api: &str| {
        run(
            &["devices", "--api", api],
            &[
                ("HUB_DATA_DIR", &empty),
                ("HUB_CA_FILE", &ca),
                ("HUB_CLIENT_CERT", &client_dir.join("hub.pem")),
                ("HUB_CLIENT_KEY", &client_dir.join("hub.key")),
            ],
            "",
        )
    };
    let e = failed(&cert_only(&by_ip), "a certificate of no user");
    assert!(
        e.contains("Unauthenticated") || e.contains("UNAUTHENTICATED") || e.contains("ops-laptop"),
        "{e}"
    );
    assert!(e.contains("\"ops-laptop\" is no user of the hub"), "{e}");
    ok(
        &run(
            &[
                "users",
                "add",
                "ops-laptop",
                "--role",
                "viewer",
                "--password-stdin",
                "--database-url",
                &hub.database(),
            ],
            &[],
            "a password for the laptop\n",
        ),
        "users add ops-laptop",
    );
    ok(
        &cert_only(&by_ip),
        "devices with a certificate and no token",
    );
    // The HTTP listener asks browsers for no certificate.
    let r = client.get(format!("{web}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_on_postgres_with_verify_full() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, server) = ca_with_server(dir.path(), "postgres");
    let (other_pki, _) = ca_with_server(dir.path(), "other");
    let pg = PgServer::start_tls(&server.join("server.pem"), &server.join("server.key"));
    let url = |ca: &Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url(),
            ca.display()
        )
    };
    let good = url(&pki.join("ca.pem"));
    ok(
        &run(
            &[
                "users",
                "add",
                "alice",
                "--role",
                "viewer",
                "--password-stdin",
                "--database-url",
                &good,
            ],
            &[],
            "a long enough password\n",
        ),
        "users add over verify-full",
    );
    let listed = ok(
        &run(&["users", "list", "--database-url", &good], &[], ""),
        "users list",
    );
    assert!(listed.contains("alice"), "{listed}");
    // The connection is encrypted (the server says so about this very session).
    let pool = pool(&good).await;
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(encrypted);
    let migrated = count(&pool, "users").await;
    assert_eq!(migrated, 1);
    // A CA that did not sign the server's certificate.
    let e = failed(
        &run(
            &[
                "users",
                "list",
                "--database-url",
                &url(&other_pki.join("ca.pem")),
            ],
            &[],
            "",
        ),
        "verify-full against the wrong CA",
    );
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "the refusal names the certificate: {e}"
    );
}

/// An MQTT client of the embedded broker at `port`: whether the broker accepted its
/// CONNECT (a CONNACK within 10 s).
async fn broker_accepts(
    port: u16,
    tls: Option<&insp_mqtt::TlsSettings>,
    login: Option<(&str, &str)>,
) -> bool {
    let mut o = rumqttc::MqttOptions::new(format!("probe-{}", free_port()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_transport(insp_mqtt::transport(tls).unwrap());
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    let (_client, mut el) = rumqttc::AsyncClient::new(o, 10);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    return a.code == rumqttc::ConnectReturnCode::Success
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_beyond_loopback_requires_tls_and_logins() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, server) = ca_with_server(dir.path(), "broker");
    let port = free_port();
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // Beyond loopback without TLS and logins: the hub does not start.
    let bare = dir.path().join("bare.toml");
    std::fs::write(
        &bare,
        format!("[embedded_broker]\nlisten = \"0.0.0.0:{port}\"\n"),
    )
    .unwrap();
    let e = failed(
        &run(&["serve", "--config", &s(&bare)], &[], ""),
        "serve with the embedded broker on 0.0.0.0 without TLS",
    );
    assert!(
        e.contains("beyond loopback") && e.contains("password_file"),
        "{e}"
    );

    // One login for the hub, one for a device; the file keeps neither password.
    let logins = dir.path().join("broker.passwd");
    let data = dir.path().join("data");
    let passwd = |name: &str| {
        ok(
            &run(
                &[
                    "broker",
                    "passwd",
                    name,
                    "--file",
                    &s(&logins),
                    "--data-dir",
                    &s(&data),
                ],
                &[],
                "",
            ),
            "broker passwd",
        )
        .trim()
        .to_string()
    };
    let hub_password = passwd("cloud-hub");
    let cam_password = passwd("cam-1");
    assert!(cam_password.len() >= 32 && cam_password != hub_password);
    let text = std::fs::read_to_string(&logins).unwrap();
    assert!(
        text.contains("cam-1:$argon2id$") && !text.contains(&cam_password),
        "{text}"
    );

    let ca = pki.join("ca.pem");
    let hub = Hub::configured(
        dir.path(),
        &format!(
            "listen = \"0.0.0.0:{port}\"\npassword_file = {:?}\n[embedded_broker.tls]\n\
             cert_file = {:?}\nkey_file = {:?}\n",
            s(&logins),
            s(&server.join("server.pem")),
            s(&server.join("server.key")),
        ),
        &format!(
            "username = \"cloud-hub\"\npassword = {hub_password:?}\n[mqtt.tls]\nca_file = {:?}\n",
            s(&ca)
        ),
        "",
    );
    // The hub came in through its own TLS front with its login.
    let metrics = format!("http://127.0.0.1:{}/metrics", hub.http);
    let t0 = Instant::now();
    loop {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        if text.contains("hub_mqtt_connected 1") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the hub did not connect:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let tls = insp_mqtt::TlsSettings {
        ca_file: ca.clone(),
        cert_file: None,
        key_file: None,
    };
    assert!(
        !broker_accepts(port, None, Some(("cam-1", &cam_password))).await,
        "a plaintext client got in"
    );
    assert!(
        !broker_accepts(port, Some(&tls), Some(("cam-1", "wrong"))).await,
        "a wrong password got in"
    );
    assert!(
        !broker_accepts(port, Some(&tls), None).await,
        "a client without a login got in"
    );

    // A device with its login over TLS: its result is stored.
    let device = Device::connect_with(("127.0.0.1", port), "plant", "cam-1", |o| {
        o.set_transport(insp_mqtt::transport(Some(&tls)).unwrap());
        o.set_credentials("cam-1", cam_password.clone());
    })
    .await;
    device
        .publish_result(&device.result(
            &uuid::Uuid::new_v4().to_string(),
            0.1,
            insp_proto::v1::Band::Ok,
            "v1",
        ))
        .await;
    let db = pool(&hub.database()).await;
    let t0 = Instant::now();
    while count(&db, "frames").await < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the device's result was not stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Both logins are in the audit trail.
    let audit = ok(
        &run(&["audit", "list", "--data-dir", &s(&data)], &[], ""),
        "audit list",
    );
    assert_eq!(audit.matches("broker.login.set").count(), 2, "{audit}");
}
