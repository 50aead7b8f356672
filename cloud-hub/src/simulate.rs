//! The fleet simulator: N devices, each its own MQTT connection, publishing frame results
//! (QoS 1) at a set total rate and, for a set share of frames, escalations carrying real
//! image files with the edge bundle's real score and map (computed once per image at
//! start, with the same code as the edge), so the hub reproduces and re-scores them. Each
//! device listens for its verdicts and times them from publish to arrival.
//!
//! Results carry the publish time as their scored time, so the hub's stored rows give
//! the publish-to-stored lag.

use anyhow::{Context, Result};
use clap::Args;
use insp_core::patchcore::{PatchCore, Timings};
use insp_proto::clock::unix_ms;
use insp_proto::v1::{AnomalyMap as WireMap, Band, DeviceState, Escalation, FrameResult, Verdict};
use insp_proto::{Message, TopicKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to simulate.
#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port (the hub's embedded broker listens on 1884 by default).
    #[arg(long, default_value_t = 1884)]
    pub port: u16,
    /// Site name.
    #[arg(long, default_value = "sim")]
    pub site: String,
    /// Devices (one MQTT connection each).
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Results per second, all devices together.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Escalations per second, all devices together (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub escalations: f64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Edge bundle: escalations carry its real score and map of each image, and its
    /// version (the hub needs the same bundle in its models folder).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Images to escalate (a folder, searched recursively for PNG/JPEG/BMP/TIFF).
    #[arg(long)]
    pub frames: Option<PathBuf>,
    /// Seconds to wait for outstanding verdicts after the last publish.
    #[arg(long, default_value_t = 5.0)]
    pub verdict_wait: f64,
    /// PEM file of the CA the broker's certificate must chain to: connect over TLS.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate of every simulated device (mutual TLS; with `--key-file`).
    #[arg(long, requires_all = ["key_file", "ca_file"])]
    pub cert_file: Option<PathBuf>,
    /// Its private key.
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Broker login of every simulated device (`cloud-hub broker passwd NAME`).
    #[arg(long)]
    pub username: Option<String>,
    /// Its password.
    #[arg(
        long,
        env = "SIM_MQTT_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    pub password: Option<insp_mqtt::Secret>,
}

impl SimulateArgs {
    /// The devices' transport: TLS when `--ca-file` is given.
    fn transport(&self) -> Result<rumqttc::Transport> {
        let tls = self.ca_file.as_ref().map(|ca| insp_mqtt::TlsSettings {
            ca_file: ca.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        });
        Ok(insp_mqtt::transport(tls.as_ref())?)
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct FleetReport {
    /// Results published (and acknowledged by the broker).
    pub results: u64,
    /// Escalations published.
    pub escalations: u64,
    /// Verdicts received for them.
    pub verdicts: u64,
    /// Publish-to-verdict latencies, seconds.
    pub verdict_latency: Vec<f64>,
    /// Verdicts whose reproduced edge score equals the published one bit for bit.
    pub verdicts_exact: u64,
    /// Seconds spent publishing.
    pub publish_seconds: f64,
    /// Unix ms of the first and last publish.
    pub first_publish_unix_ms: i64,
    /// Unix ms of the last publish.
    pub last_publish_unix_ms: i64,
}

/// An image to escalate, with the edge's score and map of it.
#[derive(Clone)]
pub struct SimFrame {
    /// Encoded bytes.
    pub bytes: Vec<u8>,
    /// Encoding.
    pub format: String,
    /// Edge score.
    pub score: f32,
    /// Edge map.
    pub map: WireMap,
    /// How the bank was searched for it.
    pub search: insp_core::memory_bank::Search,
    /// File name.
    pub name: String,
}

/// Loads up to `max` images and scores them with the bundle.
pub fn load_frames(
    bundle: &std::path::Path,
    dir: &std::path::Path,
    max: usize,
) -> Result<(String, Vec<SimFrame>)> {
    let model = PatchCore::open(bundle, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot load the bundle {}", bundle.display()))?;
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().and_then(|x| x.to_str()).is_some_and(|x| {
                ["png", "jpg", "jpeg", "bmp", "tif", "tiff"]
                    .contains(&x.to_ascii_lowercase().as_str())
            }) {
                files.push(p);
            }
        }
    }
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no images under {}", dir.display());
    let step = (files.len() / max.max(1)).max(1);
    let mut frames = Vec::new();
    for p in files.iter().step_by(step).take(max) {
        let bytes = std::fs::read(p)?;
        let image = insp_core::image::decode(&bytes, &p.display().to_string())?;
        let s = model.score_image(&image, &mut Timings::default())?;
        frames.push(SimFrame {
            format: match image::guess_format(&bytes) {
                Ok(image::ImageFormat::Png) => "png",
                Ok(image::ImageFormat::Jpeg) => "jpeg",
                Ok(image::ImageFormat::Bmp) => "bmp",
                Ok(image::ImageFormat::Tiff) => "tiff",
                _ => "unknown",
            }
            .into(),
            bytes,
            score: s.score,
            map: WireMap {
                height: s.map.height as u32,
                width: s.map.width as u32,
                data: s.map.data,
            },
            name: p.display().to_string(),
            search: model.search(),
        });
    }
    Ok((model.manifest().version.clone(), frames))
}

/// Runs the fleet and reports.
pub async fn run_fleet(
    args: &SimulateArgs,
    frames: Arc<Vec<SimFrame>>,
    model_version: String,
) -> Result<FleetReport> {
    anyhow::ensure!(
        args.devices > 0 && args.rate > 0.0,
        "--devices and --rate must be above 0"
    );
    anyhow::ensure!(
        args.escalations == 0.0 || !frames.is_empty(),
        "escalations need --bundle and --frames"
    );
    let report = Arc::new(Mutex::new(FleetReport::default()));
    let sent_at: Arc<Mutex<HashMap<String, (Instant, f32)>>> = Default::default();
    let per_device_rate = args.rate / args.devices as f64;
    let esc_every = if args.escalations > 0.0 {
        (args.rate / args.escalations).round().max(1.0) as u64
    } else {
        u64::MAX
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let transport = args.transport()?;
    let started = Instant::now();
    let first = unix_ms();
    let mut tasks = Vec::new();
    for d in 0..args.devices {
        let device = format!("sim-{d:03}");
        let mut o = MqttOptions::new(
            format!("sim-{}-{d}", &run_id[..8]),
            args.host.clone(),
            args.port,
        );
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(200)
            .set_max_packet_size(64 << 20, 64 << 20)
            .set_transport(transport.clone());
        if let Some(user) = &args.username {
            let password = args
                .password
                .as_ref()
                .map(|p| p.expose())
                .unwrap_or_default();
            o.set_credentials(user.clone(), password);
        }
        let (client, mut eventloop) = AsyncClient::new(o, 1024);
        let verdict_topic = insp_proto::topic(&args.site, &device, TopicKind::Verdict)
            .map_err(anyhow::Error::msg)?;
        let result_topic = insp_proto::topic(&args.site, &device, TopicKind::Result)
            .map_err(anyhow::Error::msg)?;
        let esc_topic = insp_proto::topic(&args.site, &device, TopicKind::Escalation)
            .map_err(anyhow::Error::msg)?;
        let state_topic =
            insp_proto::topic(&args.site, &device, TopicKind::State).map_err(anyhow::Error::msg)?;
        // The connection: acks, verdicts.
        let (report_c, sent_c) = (report.clone(), sent_at.clone());
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel::<()>();
        let sub_client = client.clone();
        let vt = verdict_topic.clone();
        let conn = tokio::spawn(async move {
            let mut connected = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub_client.subscribe(vt.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(v) = Verdict::decode(p.payload.as_ref()) {
                            let hit = sent_c.lock().ok().and_then(|mut s| s.remove(&v.frame_id));
                            if let (Some((t, score)), Ok(mut r)) = (hit, report_c.lock()) {
                                r.verdicts += 1;
                                r.verdict_latency.push(t.elapsed().as_secs_f64());
                                if v.edge_score_reproduced.to_bits() == score.to_bits() {
                                    r.verdicts_exact += 1;
                                }
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect)) => return,
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(e) => {
                        tracing::debug!("simulated device connection: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), connected_rx)
            .await
            .with_context(|| {
                format!(
                    "device {device}: no connection to {}:{} within 10 s",
                    args.host, args.port
                )
            })?
            .ok();
        let (frames, report, sent_at, site, mv) = (
            frames.clone(),
            report.clone(),
            sent_at.clone(),
            args.site.clone(),
            model_version.clone(),
        );
        let duration = Duration::from_secs_f64(args.duration);
        let state = DeviceState {
            device: device.clone(),
            status: insp_proto::v1::device_state::Status::Online as i32,
            model_version: mv.clone(),
            since_unix_ms: unix_ms(),
            agent_version: "simulator".into(),
            connected_unix_ms: unix_ms(),
        };
        client
            .publish(state_topic, QoS::AtLeastOnce, true, state.encode_to_vec())
            .await?;
        let stagger = d as u64;
        // Devices take turns: escalations evenly spread over time, not in bursts.
        let phase = if esc_every == u64::MAX {
            0
        } else {
            d as u64 * esc_every / args.devices as u64
        };
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_device_rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let start = Instant::now();
            let mut n: u64 = 0;
            let (mut results, mut escalations) = (0u64, 0u64);
            // Numbered like an agent's records, so the hub tracks them as it would.
            let streams = (
                uuid::Uuid::new_v4().as_u64_pair().0,
                uuid::Uuid::new_v4().as_u64_pair().0,
            );
            while start.elapsed() < duration {
                tick.tick().await;
                n += 1;
                let id = uuid::Uuid::new_v4().to_string();
                let now = unix_ms();
                let escalate = !frames.is_empty() && (n + phase).checked_rem(esc_every) == Some(0);
                let frame =
                    escalate.then(|| &frames[(n as usize + stagger as usize) % frames.len()]);
                let result = FrameResult {
                    site: site.clone(),
                    device: device.clone(),
                    frame_id: id.clone(),
                    source: frame.map_or_else(|| format!("sim/{n}"), |f| f.name.clone()),
                    captured_unix_ms: now,
                    scored_unix_ms: now,
                    score: frame.map_or(0.1, |f| f.score),
                    band: if escalate { Band::Uncertain } else { Band::Ok } as i32,
                    model_version: mv.clone(),
                    latency_ms: 40.0,
                    delivery: Some(insp_proto::v1::Delivery {
                        stream: streams.0,
                        seq: n - 1,
                    }),
                };
                if let Some(f) = frame {
                    let e = Escalation {
                        result: Some(insp_proto::v1::FrameResult {
                            delivery: None,
                            ..result.clone()
                        }),
                        frame: f.bytes.clone(),
                        frame_format: f.format.clone(),
                        edge_map: Some(f.map.clone()),
                        search: Some(f.search.into()),
                        delivery: Some(insp_proto::v1::Delivery {
                            stream: streams.1,
                            seq: escalations,
                        }),
                    };
                    if let Ok(mut s) = sent_at.lock() {
                        s.insert(id.clone(), (Instant::now(), f.score));
                    }
                    if client
                        .publish(
                            esc_topic.clone(),
                            QoS::AtLeastOnce,
                            false,
                            e.encode_to_vec(),
                        )
                        .await
                        .is_err()
                    {
                        break;
                    }
                    escalations += 1;
                }
                if client
                    .publish(
                        result_topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        result.encode_to_vec(),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
                results += 1;
            }
            if let Ok(mut r) = report.lock() {
                r.results += results;
                r.escalations += escalations;
            }
            (client, conn)
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await?);
    }
    let publish_seconds = started.elapsed().as_secs_f64();
    let last = unix_ms();
    // Wait for outstanding verdicts.
    let wait_until = Instant::now() + Duration::from_secs_f64(args.verdict_wait);
    while Instant::now() < wait_until {
        let outstanding = sent_at.lock().map(|s| s.len()).unwrap_or(0);
        if outstanding == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (client, conn) in conns {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
    }
    let mut r = report
        .lock()
        .map_err(|_| anyhow::anyhow!("report lock poisoned"))?
        .clone();
    r.publish_seconds = publish_seconds;
    r.first_publish_unix_ms = first;
    r.last_publish_unix_ms = last;
    Ok(r)
}

/// The `p`-quantile (0..1) of `v` (sorted in place); NaN when empty.
pub fn quantile(v: &mut [f64], p: f64) -> f64 {
    insp_core::quantile::nearest_rank(v, p)
}

/// `cloud-hub simulate`.
pub async fn run(args: SimulateArgs) -> Result<()> {
    let (version, frames) = match (&args.bundle, &args.frames) {
        (Some(b), Some(f)) => {
            let b = b.clone();
            let f = f.clone();
            tokio::task::spawn_blocking(move || load_frames(&b, &f, 16)).await??
        }
        (Some(b), None) => (crate::models::read_manifest(b)?.version, Vec::new()),
        _ => ("simulated".to_string(), Vec::new()),
    };
    let mut args = args;
    if frames.is_empty() {
        args.escalations = 0.0;
    }
    let mut r = run_fleet(&args, Arc::new(frames), version).await?;
    println!(
        "published {} results and {} escalations from {} devices in {:.1} s ({:.0} results/s)",
        r.results,
        r.escalations,
        args.devices,
        r.publish_seconds,
        r.results as f64 / r.publish_seconds
    );
    if r.escalations > 0 {
        let p50 = quantile(&mut r.verdict_latency, 0.5) * 1e3;
        let p99 = quantile(&mut r.verdict_latency, 0.99) * 1e3;
        println!(
            "verdicts: {} of {} back (p50 {p50:.0} ms, p99 {p99:.0} ms from publish); reproduced edge score bit-identical in {} of {}",
            r.verdicts, r.escalations, r.verdicts_exact, r.verdicts
        );
    }
    Ok(())
}
