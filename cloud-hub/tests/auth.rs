//! The authenticated API and the audit trail, against a real hub process on real
//! PostgreSQL: users and tokens made with the `cloud-hub` commands, gRPC calls without a
//! token, with malformed, unknown, expired and revoked ones (UNAUTHENTICATED), with a
//! viewer's token trying to label (PERMISSION_DENIED), and an operator's label recorded
//! as that user; then `cloud-hub audit verify` passes, and finds a row edited with psql,
//! a row deleted with psql, and (against a head kept from before) rows cut off at the end.

mod common;

use common::*;
use insp_proto::hub::devices_client::DevicesClient;
use insp_proto::hub::models_client::ModelsClient;
use insp_proto::hub::reviews_client::ReviewsClient;
use insp_proto::hub::{
    ListDevicesRequest, ListModelsRequest, ListPendingRequest, ReviewLabel, SubmitReviewRequest,
};
use std::io::Write;
use std::process::{Command, Output, Stdio};
use tonic::transport::Channel;
use tonic::Code;

/// `cloud-hub ARGS` with `stdin` on the given database.
fn hub_cmd(db: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .args(args)
        .args(["--database-url", db])
        .env("USER", "tester")
        .env_remove("HUB_USER_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A request carrying `authorization: <header>` (none if None).
fn req<T>(msg: T, header: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(h) = header {
        r.metadata_mut()
            .insert("authorization", h.parse().expect("ascii header"));
    }
    r
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn psql(db: &str, sql: &str) {
    let out = Command::new("psql")
        .args([db, "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs (PostgreSQL client tools installed)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_needs_a_token_and_a_role_and_the_audit_trail_detects_tampering() {
    let pg = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: Some(&pg.url),
        client_id: "hub-auth",
        group: "hubs",
        site: "plant-a",
    });
    // An escalation to label, from a device on the embedded broker.
    let mut dev = Device::connect(("127.0.0.1", port), "plant-a", "cam-1").await;
    let (frame_id, _) = dev.escalate(defect_image()).await;
    assert_eq!(dev.verdict(60).await.frame_id, frame_id);
    dev.close().await;

    // Users and tokens from the command line.
    let db = pg.url.as_str();
    ok(&hub_cmd(
        db,
        &[
            "users",
            "add",
            "ana",
            "--role",
            "operator",
            "--password-stdin",
        ],
        "ana-password-1\n",
    ));
    ok(&hub_cmd(
        db,
        &["users", "add", "vic", "--role", "viewer", "--no-password"],
        "",
    ));
    let dup = failed(&hub_cmd(
        db,
        &["users", "add", "ana", "--role", "viewer", "--no-password"],
        "",
    ));
    assert!(dup.contains("exists already"), "{dup}");
    let bad_role = failed(&hub_cmd(
        db,
        &["users", "add", "eve", "--role", "root", "--no-password"],
        "",
    ));
    assert!(bad_role.contains("unknown role"), "{bad_role}");
    let short = failed(&hub_cmd(
        db,
        &[
            "users",
            "add",
            "eve",
            "--role",
            "viewer",
            "--password-stdin",
        ],
        "short\n",
    ));
    assert!(short.contains("too short"), "{short}");
    let listed = ok(&hub_cmd(db, &["users", "list"], ""));
    assert!(
        listed.contains("admin") && listed.contains("ana") && listed.contains("vic"),
        "{listed}"
    );
    assert!(!listed.contains("eve"), "{listed}");
    let token_of = |user: &str, expires: &str| {
        let t = ok(&hub_cmd(
            db,
            &["tokens", "create", "--user", user, "--expires", expires],
            "",
        ))
        .trim()
        .to_string();
        assert!(t.starts_with("insp_"), "{t}");
        t
    };
    let ana = token_of("ana", "1d");
    let vic = token_of("vic", "never");
    let short_lived = token_of("vic", "1s");
    let revoked = token_of("ana", "1d");
    let missing = failed(&hub_cmd(db, &["tokens", "create", "--user", "nobody"], ""));
    assert!(missing.contains("no user"), "{missing}");
    let revoked_id = revoked.split('_').nth(1).unwrap().to_string();
    ok(&hub_cmd(db, &["tokens", "revoke", &revoked_id], ""));
    // Nothing but hashes in the database.
    let pool = pool(db).await;
    let secrets: i64 = sqlx::query(
        "SELECT COUNT(*) FROM api_tokens WHERE token_hash = $1 OR token_hash = $2 OR id = $1",
    )
    .bind(ana.clone())
    .bind(vic.clone())
    .fetch_one(&pool)
    .await
    .map(|r| sqlx::Row::get(&r, 0))
    .unwrap();
    assert_eq!(secrets, 0);

    let channel = Channel::from_shared(hub.api())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut devices = DevicesClient::new(channel.clone());
    let mut reviews = ReviewsClient::new(channel.clone());
    let mut models = ModelsClient::new(channel);

    // Without a token, with malformed, unknown, expired and revoked ones: UNAUTHENTICATED,
    // each with a message that says what is wrong.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let unknown = format!("insp_{}_{}", "0".repeat(16), "a".repeat(64));
    for (header, says) in [
        (None, "no credentials"),
        (Some("Bearer nope".to_string()), "malformed"),
        (Some("Basic YWRtaW46YWRtaW4=".to_string()), "malformed"),
        (Some("Bearer".to_string()), "malformed"),
        (Some(bearer(&format!("{ana}x"))), "malformed"),
        (Some(bearer(&unknown)), "unknown or revoked"),
        (Some(bearer(&revoked)), "unknown or revoked"),
        (Some(bearer(&short_lived)), "expired"),
    ] {
        let e = devices
            .list_devices(req(ListDevicesRequest {}, header.as_deref()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{header:?}: {e:?}");
        assert!(e.message().contains(says), "{header:?}: {}", e.message());
        let e = reviews
            .submit_review(req(
                SubmitReviewRequest {
                    frame_id: frame_id.clone(),
                    review_label: ReviewLabel::Good as i32,
                    note: String::new(),
                },
                header.as_deref(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{header:?}: {e:?}");
    }
    // A viewer reads, but may not label or fetch models.
    let pending = reviews
        .list_pending(req(
            ListPendingRequest {
                limit: 10,
                device: String::new(),
            },
            Some(&bearer(&vic)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.escalations.len(), 1);
    let e = reviews
        .submit_review(req(
            SubmitReviewRequest {
                frame_id: frame_id.clone(),
                review_label: ReviewLabel::Good as i32,
                note: "viewer".into(),
            },
            Some(&bearer(&vic)),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("operator role"), "{}", e.message());
    let e = models
        .list_models(req(ListModelsRequest {}, Some(&bearer(&ana))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // An operator labels; the label records the token's user.
    let review = reviews
        .submit_review(req(
            SubmitReviewRequest {
                frame_id: frame_id.clone(),
                review_label: ReviewLabel::Defect as i32,
                note: "scratch at the edge".into(),
            },
            Some(&bearer(&ana)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(review.operator, "ana");
    // No label (REVIEW_LABEL_UNSPECIFIED), or a number this hub does not know.
    for review_label in [ReviewLabel::Unspecified as i32, 99] {
        let e = reviews
            .submit_review(req(
                SubmitReviewRequest {
                    frame_id: frame_id.clone(),
                    review_label,
                    note: String::new(),
                },
                Some(&bearer(&ana)),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let (operator, label): (String, String) =
        sqlx::query("SELECT operator, label FROM reviews WHERE frame_id = $1")
            .bind(frame_id.clone())
            .fetch_one(&pool)
            .await
            .map(|r| (sqlx::Row::get(&r, 0), sqlx::Row::get(&r, 1)))
            .unwrap();
    assert_eq!((operator.as_str(), label.as_str()), ("ana", "defect"));
    // The bootstrap admin's token (the CLI client finds it in the data folder) does all.
    let shown = hub.cli(&["reviews", "show", &frame_id]);
    assert!(shown.contains("defect by ana"), "{shown}");
    assert!(hub.cli(&["models", "list"]).contains("edge"));
    // A disabled user's token stops working.
    ok(&hub_cmd(db, &["users", "disable", "vic"], ""));
    let e = devices
        .list_devices(req(ListDevicesRequest {}, Some(&bearer(&vic))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("disabled"), "{}", e.message());
    // No refusal hurt the hub; they are counted.
    assert_eq!(http_get(hub.http, "/readyz").map(|r| r.0), Some(200));
    assert!(hub.metric(r#"hub_api_refused_total{code="unauthenticated"}"#) >= 17.0);
    assert_eq!(
        hub.metric(r#"hub_api_refused_total{code="permission_denied"}"#),
        2.0
    );

    // The audit trail: every change above, with who did it.
    let rows: Vec<(i64, String, String)> =
        sqlx::query("SELECT seq, actor, action FROM audit ORDER BY seq")
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
    let actions: Vec<(&str, &str)> = rows
        .iter()
        .map(|(_, a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("hub:bootstrap", "user.add"),
            ("hub:bootstrap", "token.create"),
            ("cli:tester", "user.add"),
            ("cli:tester", "user.add"),
            ("cli:tester", "token.create"),
            ("cli:tester", "token.create"),
            ("cli:tester", "token.create"),
            ("cli:tester", "token.create"),
            ("cli:tester", "token.revoke"),
            ("ana", "review.label"),
            ("cli:tester", "user.disable"),
        ]
    );
    let listed = ok(&hub_cmd(db, &["audit", "list"], ""));
    assert!(listed.contains("review.label"), "{listed}");
    let verified = ok(&hub_cmd(db, &["audit", "verify"], ""));
    assert!(verified.contains("verified: 11 rows"), "{verified}");
    let head = verified.trim().rsplit(' ').next().unwrap().to_string();

    // A row edited with psql is named.
    psql(
        db,
        "UPDATE audit SET details = replace(details, '\"defect\"', '\"good\"') WHERE action = 'review.label'",
    );
    let err = failed(&hub_cmd(db, &["audit", "verify"], ""));
    assert!(err.contains("audit row 10 was altered"), "{err}");
    psql(
        db,
        "UPDATE audit SET details = replace(details, '\"good\"', '\"defect\"') WHERE action = 'review.label'",
    );
    ok(&hub_cmd(
        db,
        &["audit", "verify", "--expect-head", &head],
        "",
    ));
    // A deleted row is named.
    psql(db, "DELETE FROM audit WHERE seq = 6");
    let err = failed(&hub_cmd(db, &["audit", "verify"], ""));
    assert!(err.contains("audit row 6 was removed"), "{err}");
    // Rows cut off at the end leave a whole chain: the head kept from before shows it.
    psql(db, "DELETE FROM audit WHERE seq >= 6");
    ok(&hub_cmd(db, &["audit", "verify"], ""));
    let err = failed(&hub_cmd(
        db,
        &["audit", "verify", "--expect-head", &head],
        "",
    ));
    assert!(err.contains("expected head row 11"), "{err}");
    pool.close().await;
}
