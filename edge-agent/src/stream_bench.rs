//! `edge-agent bench-stream`: the whole pipeline under load, in one process.
//!
//! Three runs over the same frames and bundle: (1) the baseline, scoring and spooling with
//! MQTT off; (2) the full pipeline as fast as frames are taken, publishing to the broker
//! with QoS 1, for sustained frames per second; (3) the full pipeline paced below that
//! maximum, for the latency from frame arrival to the broker's acknowledgement (p50, p99)
//! without queueing.

use crate::config::{AgentConfig, SourceKind};
use crate::telemetry::{Samples, Telemetry};
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `bench-stream`.
#[derive(Args)]
pub struct StreamBenchArgs {
    /// Bundle folder written by `fit`.
    #[arg(long)]
    bundle: PathBuf,
    /// Images to stream: an MVTec-AD-layout folder (its test split) or any image folder.
    #[arg(long)]
    data: PathBuf,
    /// MQTT broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// MQTT broker port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Frames per run.
    #[arg(long, default_value_t = 300)]
    frames: u64,
    /// Rate of the paced run, as a share of the measured maximum.
    #[arg(long, default_value_t = 0.8)]
    pace: f64,
    /// Also write the figures as one JSON object here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Frames per second between the first and the last sample.
fn rate(samples: &[(std::time::Instant, f64)]) -> f64 {
    match (samples.first(), samples.last()) {
        (Some(a), Some(b)) if samples.len() > 1 && b.0 > a.0 => {
            (samples.len() - 1) as f64 / (b.0 - a.0).as_secs_f64()
        }
        _ => 0.0,
    }
}

fn percentile_ms(samples: &[(std::time::Instant, f64)], q: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|s| s.1 * 1e3).collect();
    if v.is_empty() {
        return 0.0;
    }
    insp_core::quantile::nearest_rank(&mut v, q)
}

/// Runs the benchmark and prints the figures.
pub fn run(args: StreamBenchArgs, device: &candle_core::Device) -> Result<()> {
    let replay = if args.data.join("test").is_dir() {
        args.data.join("test")
    } else {
        args.data.clone()
    };
    let scratch = tempfile::tempdir().context("cannot create a scratch folder")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let config = |mqtt: bool, rate: f64, run: &str| -> Result<AgentConfig> {
        let mut c = AgentConfig::default();
        c.device.site = "bench".into();
        c.device.id = format!("bench-{}", std::process::id());
        c.model.bundle = args.bundle.clone();
        c.model.reload_check_s = 0;
        c.source.kind = SourceKind::Replay;
        c.source.path = replay.clone();
        c.source.rate_fps = rate;
        c.source.repeat = true;
        c.source.limit = args.frames;
        c.spool.dir = scratch.path().join(run);
        c.http.listen = String::new();
        c.mqtt.enabled = mqtt;
        c.mqtt.host = args.host.clone();
        c.mqtt.port = args.port;
        c.mqtt.metrics_interval_s = 0;
        // The bench measures delivery, not the cloud: frames that would wait for a
        // verdict are decided at once.
        c.routing.verdict_deadline_ms = 0;
        Ok(c)
    };
    let pipeline = |c: AgentConfig| -> Result<Samples> {
        let telemetry = Arc::new(Telemetry::new());
        telemetry.keep_samples();
        runtime.block_on(crate::run_cmd::run_pipeline(
            c,
            device.clone(),
            telemetry.clone(),
            true,
        ))?;
        Ok(telemetry.samples())
    };

    println!(
        "stream of {} frames from {}, bundle {}, broker {}:{}",
        args.frames,
        replay.display(),
        args.bundle.display(),
        args.host,
        args.port
    );
    let baseline = pipeline(config(false, 0.0, "baseline")?)?;
    let base_fps = rate(&baseline.scored);
    let full = pipeline(config(true, 0.0, "full")?)?;
    check_complete(&full, args.frames, "full-rate")?;
    let full_fps = rate(&full.published);
    let paced_rate = (full_fps * args.pace).max(0.5);
    let paced = pipeline(config(true, paced_rate, "paced")?)?;
    check_complete(&paced, args.frames, "paced")?;
    let (p50, p99) = (
        percentile_ms(&paced.published, 0.5),
        percentile_ms(&paced.published, 0.99),
    );
    let score_p50 = percentile_ms(&paced.scored, 0.5);

    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "run", "frames/s", "p50 ms", "p99 ms"
    );
    println!(
        "{:<44} {:>9.1} {:>9} {:>9}",
        "baseline: score + spool, MQTT off", base_fps, "-", "-"
    );
    println!(
        "{:<44} {:>9.1} {:>9} {:>9}",
        "full pipeline, as fast as frames are taken", full_fps, "-", "-"
    );
    println!(
        "{:<44} {:>9.1} {:>9.1} {:>9.1}",
        format!("paced at {paced_rate:.1} frames/s: arrival -> PubAck"),
        rate(&paced.published),
        p50,
        p99
    );
    println!(
        "sustained rate with MQTT = {:.2} x the baseline; in the paced run scoring takes {score_p50:.1} ms (p50) of the {p50:.1} ms to the acknowledgement",
        if base_fps > 0.0 { full_fps / base_fps } else { 0.0 }
    );
    if let Some(path) = &args.json {
        let v = json!({
            "frames": args.frames,
            "baseline_fps": base_fps,
            "pipeline_fps": full_fps,
            "paced_fps": paced_rate,
            "publish_ack_ms_p50": p50,
            "publish_ack_ms_p99": p99,
            "score_ms_p50": score_p50,
        });
        write_json(path, &v)?;
    }
    Ok(())
}

fn check_complete(samples: &Samples, frames: u64, run: &str) -> Result<()> {
    anyhow::ensure!(
        samples.published.len() as u64 >= frames,
        "{run} run: only {} of {frames} results were acknowledged by the broker",
        samples.published.len()
    );
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("cannot write {}", path.display()))
}
