//! Reject-gate hooks: on every final NG decision, a command and/or a webhook, so the line
//! can divert the part. Hooks run off the frame path, one at a time, each with a time
//! limit; a failing hook is logged and counted, never retried (the part has moved on).
//!
//! Hook jobs are in the decision journal until they have run, so a job queued or running
//! when the agent stops (a crash, a kill -9, a clean stop) runs after the next start:
//! hooks run at least once, and a hook that was running at a crash may run twice (it gets
//! `{frame_id}` to recognise that).

use crate::config::HookConfig;
use crate::decisions::{DecidedBy, Decision};
use crate::journal::{Entry, Journal};
use crate::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest a hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Replaces `{frame_id}`, `{source}`, `{score}` and `{decided_by}` in a hook argument.
/// Each placeholder becomes part of one argument (no shell is involved); `{source}`, which
/// a pushing caller chooses, is reduced to letters, digits and `._/:-`.
pub fn expand(arg: &str, d: &Decision) -> String {
    let source: String = d
        .source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._/:-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    arg.replace("{frame_id}", &d.frame_id.to_string())
        .replace("{source}", &source)
        .replace("{score}", &format!("{:.4}", d.edge_score))
        .replace(
            "{decided_by}",
            d.decided_by.map_or("edge", DecidedBy::as_str),
        )
}

/// Starts the hook runner if any hook is configured; returns the queue to feed it. Each
/// job that has run is marked done in `journal`.
pub fn start(
    config: &HookConfig,
    telemetry: Arc<Telemetry>,
    journal: Option<Arc<Journal>>,
) -> Option<mpsc::Sender<Decision>> {
    if config.on_ng_command.is_empty() && config.on_ng_webhook.is_none() {
        return None;
    }
    let (tx, mut rx) = mpsc::channel::<Decision>(1024);
    let config = config.clone();
    let client = reqwest::Client::builder()
        .timeout(HOOK_TIMEOUT)
        .build()
        .ok();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if let Some((program, args)) = config.on_ng_command.split_first() {
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args.iter().map(|a| expand(a, &d)))
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true);
                match tokio::time::timeout(HOOK_TIMEOUT, cmd.status()).await {
                    Ok(Ok(status)) if status.success() => {}
                    Ok(Ok(status)) => {
                        telemetry.hook_failed();
                        tracing::error!(frame = %d.frame_id, "reject hook {program} exited with {status}");
                    }
                    Ok(Err(e)) => {
                        telemetry.hook_failed();
                        tracing::error!(frame = %d.frame_id, "reject hook {program} could not start: {e}");
                    }
                    Err(_) => {
                        telemetry.hook_failed();
                        tracing::error!(frame = %d.frame_id, "reject hook {program} ran past {HOOK_TIMEOUT:?} and was killed");
                    }
                }
            }
            if let (Some(url), Some(client)) = (&config.on_ng_webhook, &client) {
                let sent = client.post(url).json(&d).send().await;
                match sent.and_then(|r| r.error_for_status()) {
                    Ok(_) => {}
                    Err(e) => {
                        telemetry.hook_failed();
                        tracing::error!(frame = %d.frame_id, "reject webhook {url} failed: {e}");
                    }
                }
            }
            if let Some(j) = &journal {
                j.record(Entry::HookDone {
                    frame_id: d.frame_id,
                });
            }
        }
    });
    Some(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::routing::Band;

    #[tokio::test]
    async fn the_command_hook_runs_with_the_frame_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("rejects.txt");
        let config = HookConfig {
            on_ng_command: vec![
                "sh".into(),
                "-c".into(),
                format!("echo \"$0 $1\" >> {}", out.display()),
                "{frame_id}".into(),
                "{decided_by}".into(),
            ],
            on_ng_webhook: None,
        };
        let t = Arc::new(Telemetry::new());
        let tx = start(&config, t, None).unwrap();
        let d = Decision {
            frame_id: uuid::Uuid::new_v4(),
            source: "a.png; rm -rf /".into(),
            edge_score: 3.0,
            edge_band: Band::Uncertain,
            band: Band::Ng,
            decided_by: Some(DecidedBy::Fallback),
            cloud_score: None,
            model_version: "m".into(),
        };
        assert_eq!(expand("{source}", &d), "a.png__rm_-rf_/");
        tx.send(d.clone()).await.unwrap();
        let want = format!("{} fallback", d.frame_id);
        for _ in 0..100 {
            if std::fs::read_to_string(&out).is_ok_and(|s| s.trim() == want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("hook output {:?}", std::fs::read_to_string(&out));
    }
}
