//! The command-line client of the gRPC API: `devices`, `reviews list|show|label`,
//! `models list|fetch`, printing readable tables. Every call carries the API token from
//! `HUB_TOKEN`, else the file `--token-file` / `HUB_TOKEN_FILE`, else
//! `<HUB_DATA_DIR or hub-data>/admin.token` (what a hub on the embedded defaults writes).

use crate::grpc::MAX_MESSAGE;
use crate::table::{time, Table};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use insp_proto::hub::devices_client::DevicesClient;
use insp_proto::hub::models_client::ModelsClient;
use insp_proto::hub::reviews_client::ReviewsClient;
use insp_proto::hub::*;
use insp_proto::v1::Band;
use std::path::PathBuf;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Where the hub's gRPC API is, and the token to call it with.
#[derive(Args, Debug, Clone)]
pub struct ApiAddress {
    /// gRPC address of the hub.
    #[arg(
        long,
        env = "HUB_API",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub api: String,
    /// File holding the API token (`cloud-hub tokens create`); the token itself may be in
    /// `HUB_TOKEN` instead. Default: `admin.token` in `HUB_DATA_DIR` (or `hub-data`), which
    /// a hub with `auth.bootstrap_admin` writes.
    #[arg(long, env = "HUB_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the hub's API certificate (`pki/ca.pem`), for an
    /// `https://` address: the hub's certificate must chain to it and name the host of
    /// `--api`.
    #[arg(long, env = "HUB_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// This client's certificate, for a hub whose `api.tls.client_ca_file` requires one
    /// (with `--key-file`).
    #[arg(long, env = "HUB_CLIENT_CERT", global = true)]
    pub cert_file: Option<PathBuf>,
    /// The private key of `--cert-file`.
    #[arg(long, env = "HUB_CLIENT_KEY", global = true)]
    pub key_file: Option<PathBuf>,
}

/// The TLS settings of an `https://` address: the CA (required) and the optional client
/// identity, read and checked before connecting.
fn client_tls(a: &ApiAddress) -> Result<tonic::transport::ClientTlsConfig> {
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
    };
    let Some(ca_file) = &a.ca_file else {
        anyhow::bail!(
            "{} is https://: give the CA that signed the hub's certificate with --ca-file \
             or HUB_CA_FILE (pki/ca.pem)",
            a.api
        );
    };
    // Checked here, so a wrong file is named instead of failing in the handshake.
    insp_mqtt::pem::roots("--ca-file", ca_file)?;
    let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(read("the CA file", ca_file)?),
    );
    match (&a.cert_file, &a.key_file) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read("the client certificate", cert)?,
                read("the client key", key)?,
            ));
        }
        _ => anyhow::bail!(
            "--cert-file and --key-file (HUB_CLIENT_CERT, HUB_CLIENT_KEY) go together"
        ),
    }
    Ok(tls)
}

/// Sends the bearer token with every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// The token to send: `HUB_TOKEN`, the token file, or none (the hub then answers
/// UNAUTHENTICATED with what to do).
fn bearer(a: &ApiAddress) -> Result<Bearer> {
    let token = match std::env::var("HUB_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
        _ => {
            let (path, explicit) = match &a.token_file {
                Some(p) => (p.clone(), true),
                None => (
                    std::env::var_os("HUB_DATA_DIR")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("hub-data"))
                        .join(crate::config::ADMIN_TOKEN_FILE),
                    false,
                ),
            };
            match std::fs::read_to_string(&path) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) if explicit => {
                    anyhow::bail!("cannot read the token file {}: {e}", path.display())
                }
                Err(_) => None,
            }
        }
    };
    match token {
        None => Ok(Bearer(None)),
        Some(t) => {
            let value = format!("Bearer {t}").parse().map_err(|_| {
                anyhow::anyhow!(
                    "the API token has characters a header cannot carry: it is not a token of `cloud-hub tokens create`"
                )
            })?;
            Ok(Bearer(Some(value)))
        }
    }
}

async fn channel(a: &ApiAddress) -> Result<Authed> {
    let bearer = bearer(a)?;
    let mut endpoint = Channel::from_shared(a.api.clone()).with_context(|| {
        format!(
            "{:?} is not a URL like http://HOST:PORT or https://HOST:PORT",
            a.api
        )
    })?;
    let https = a.api.starts_with("https://");
    if https {
        endpoint = endpoint
            .tls_config(client_tls(a)?)
            .context("the TLS settings of the API client")?;
    } else if a.ca_file.is_some() || a.cert_file.is_some() {
        anyhow::bail!(
            "--ca-file / --cert-file (HUB_CA_FILE, HUB_CLIENT_CERT) are for TLS: use an https:// address, not {}",
            a.api
        );
    }
    let channel = endpoint.connect().await.with_context(|| {
        format!(
            "cannot reach the hub's API at {} (is `cloud-hub serve` running?{})",
            a.api,
            if https {
                " Does its certificate chain to --ca-file and name this host? Does it require \
                 a client certificate (--cert-file, --key-file)?"
            } else {
                " If the hub serves TLS ([api.tls]), use https:// and --ca-file"
            }
        )
    })?;
    Ok(InterceptedService::new(channel, bearer))
}

fn status(e: tonic::Status) -> anyhow::Error {
    match e.code() {
        tonic::Code::Unauthenticated => anyhow::anyhow!(
            "{}: {} (the client sends the token in HUB_TOKEN, or in the file --token-file / \
             HUB_TOKEN_FILE, or in <HUB_DATA_DIR>/admin.token; make one with \
             `cloud-hub tokens create --user NAME`)",
            e.code(),
            e.message()
        ),
        // What a TLS listener does to a plaintext client, or a listener that requires
        // client certificates to a client without one: it cuts the connection.
        tonic::Code::Unknown
        | tonic::Code::Internal
        | tonic::Code::Unavailable
        | tonic::Code::Cancelled
            if [
                "transport error",
                "h2 protocol error",
                "connection",
                "broken pipe",
                "operation was canceled",
            ]
            .iter()
            .any(|m| e.message().contains(m)) =>
        {
            anyhow::anyhow!(
                "{}: {} (the hub broke the connection off: if it serves TLS ([api.tls]), call \
                 it with --api https://HOST:PORT and --ca-file; if it requires client \
                 certificates (api.tls.client_ca_file), give --cert-file and --key-file)",
                e.code(),
                e.message()
            )
        }
        _ => anyhow::anyhow!("{}: {}", e.code(), e.message()),
    }
}

/// `cloud-hub devices`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevicesArgs {
    /// Enrol or revoke a device's certificate (no API call: the CA folder's work).
    #[command(subcommand)]
    pub command: Option<crate::pki_cmd::DevicesCommand>,
    /// Show one device (`name` or `site/name`) in detail.
    pub device: Option<String>,
    #[command(flatten)]
    api: ApiAddress,
}

/// Lists devices or shows one.
pub async fn devices(args: DevicesArgs) -> Result<()> {
    let mut c = DevicesClient::new(channel(&args.api).await?);
    if let Some(name) = args.device {
        let d = c
            .get_device(GetDeviceRequest { device: name })
            .await
            .map_err(status)?
            .into_inner();
        println!("device      {}/{}", d.site, d.device);
        println!("status      {}", d.status);
        println!("model       {}", d.model_version);
        println!("agent       {}", d.agent_version);
        println!("first seen  {}", time(d.first_seen_unix_ms));
        println!("last seen   {}", time(d.last_seen_unix_ms));
        println!("frames      {} ({} escalated)", d.frames, d.escalations);
        if let Some(m) = d.metrics {
            println!(
                "metrics     ok {} / uncertain {} / ng {}, rejected {}, dropped {}, spool {} results + {} escalations, fallbacks {}, mean score latency {:.1} ms",
                m.frames_ok, m.frames_uncertain, m.frames_ng, m.frames_rejected, m.frames_dropped,
                m.spool_results, m.spool_escalations, m.verdict_fallbacks, m.score_latency_ms_mean
            );
        }
        return Ok(());
    }
    let list = c
        .list_devices(ListDevicesRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let mut t = Table::new(&[
        "SITE",
        "DEVICE",
        "STATUS",
        "MODEL",
        "FRAMES",
        "ESCALATED",
        "LAST SEEN",
    ]);
    for d in list.devices {
        t.row(vec![
            d.site,
            d.device,
            d.status,
            d.model_version,
            d.frames.to_string(),
            d.escalations.to_string(),
            time(d.last_seen_unix_ms),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// `cloud-hub reviews ...`.
#[derive(Subcommand, Debug)]
pub enum ReviewsCommand {
    /// Escalations waiting for a label, oldest first.
    List {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        api: ApiAddress,
    },
    /// One escalation: scores per model, verdict, labels; optionally saves its frame
    /// and maps.
    Show {
        /// Frame id.
        frame_id: String,
        /// Write the frame and the maps (.npy) into this folder.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        api: ApiAddress,
    },
    /// Labels an escalation `good`, `defect`, `camera-fault` or `unsure`, as the token's
    /// user.
    Label {
        /// Frame id.
        frame_id: String,
        /// `good`, `defect`, `camera-fault` or `unsure`.
        label: String,
        /// A note.
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        api: ApiAddress,
    },
}

/// A wire band's name, `-` when unspecified.
fn band(b: i32) -> &'static str {
    Band::try_from(b)
        .ok()
        .and_then(|b| insp_core::routing::Band::try_from(b).ok())
        .map_or("-", insp_core::routing::Band::as_str)
}

/// Runs a `reviews` command.
pub async fn reviews(cmd: ReviewsCommand) -> Result<()> {
    match cmd {
        ReviewsCommand::List { device, limit, api } => {
            let mut c = ReviewsClient::new(channel(&api).await?);
            let list = c
                .list_pending(ListPendingRequest {
                    limit,
                    device: device.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let mut t = Table::new(&[
                "FRAME", "DEVICE", "CAPTURED", "EDGE", "STATE", "VERDICT", "FUSED", "CLOUD",
            ]);
            for e in list.escalations {
                let v = e.verdict.as_ref();
                t.row(vec![
                    e.frame_id,
                    e.device,
                    time(e.captured_unix_ms),
                    format!("{:.4}", e.edge_score),
                    e.state,
                    v.map_or("-".into(), |v| band(v.band).to_string()),
                    v.map_or("-".into(), |v| format!("{:.3}", v.fused)),
                    v.filter(|v| v.cloud_score.is_finite())
                        .map_or("-".into(), |v| format!("{:.4}", v.cloud_score)),
                ]);
            }
            print!("{}", t.render());
        }
        ReviewsCommand::Show { frame_id, out, api } => {
            let mut c =
                ReviewsClient::new(channel(&api).await?).max_decoding_message_size(MAX_MESSAGE);
            let d = c
                .get_escalation(GetEscalationRequest {
                    frame_id: frame_id.clone(),
                    without_images: out.is_none(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let s = d.summary.unwrap_or_default();
            println!(
                "frame     {} from {}/{} ({})",
                s.frame_id, s.site, s.device, s.source
            );
            println!("captured  {}", time(s.captured_unix_ms));
            println!(
                "edge      score {:.6} with {}",
                s.edge_score, s.model_version
            );
            println!(
                "state     {}{}",
                s.state,
                if d.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.error)
                }
            );
            if let Some(v) = &s.verdict {
                println!(
                    "verdict   {} (fused {:.3}); edge score reproduced {} ({}), decided {}",
                    band(v.band),
                    v.fused,
                    v.edge_score_reproduced,
                    if v.edge_reproduced_exactly {
                        "bit-identical"
                    } else {
                        "DIFFERS"
                    },
                    time(v.decided_unix_ms)
                );
            }
            let mut t = Table::new(&["MODEL", "VERSION", "SCORE", "OK BELOW", "NG ABOVE", "MS"]);
            for i in &d.inferences {
                t.row(vec![
                    i.model.clone(),
                    i.model_version.clone(),
                    format!("{:.6}", i.score),
                    format!("{:.4}", i.ok_below),
                    format!("{:.4}", i.ng_above),
                    format!("{:.1}", i.latency_ms),
                ]);
            }
            print!("{}", t.render());
            for r in &d.reviews {
                println!(
                    "label     {} by {} at {} {}",
                    r.label,
                    r.operator,
                    time(r.created_unix_ms),
                    r.note
                );
            }
            if let Some(out) = out {
                std::fs::create_dir_all(&out)
                    .with_context(|| format!("cannot create {}", out.display()))?;
                let ext = if d.frame_format.is_empty() {
                    "bin"
                } else {
                    &d.frame_format
                };
                let frame = out.join(format!("{frame_id}.{ext}"));
                std::fs::write(&frame, &d.frame)?;
                println!("wrote     {}", frame.display());
                for m in d.maps {
                    if let Some(map) = m.map {
                        let path = out.join(format!("{frame_id}-{}.npy", m.model));
                        let map = insp_core::anomaly_map::AnomalyMap::new(
                            map.height as usize,
                            map.width as usize,
                            map.data,
                        );
                        std::fs::write(&path, map.to_npy())?;
                        println!("wrote     {}", path.display());
                    }
                }
            }
        }
        ReviewsCommand::Label {
            frame_id,
            label,
            note,
            api,
        } => {
            let mut c = ReviewsClient::new(channel(&api).await?);
            let r = c
                .submit_review(SubmitReviewRequest {
                    frame_id,
                    label,
                    note,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "label {} recorded for {} by {} (review {})",
                r.label, r.frame_id, r.operator, r.id
            );
        }
    }
    Ok(())
}

/// `cloud-hub models ...`.
#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Bundles the hub knows.
    List {
        #[command(flatten)]
        api: ApiAddress,
    },
    /// Downloads a bundle and verifies every file's hash.
    Fetch {
        /// Bundle version.
        version: String,
        /// Folder to write it into.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        api: ApiAddress,
    },
    /// Signs a bundle folder: checks its files against the manifest and writes
    /// `signature.json` (ed25519 over the manifest) with a private key file.
    Sign {
        /// Bundle folder.
        bundle: PathBuf,
        /// Private key file (`cloud-hub keys generate`).
        #[arg(long)]
        key: PathBuf,
    },
    /// Stores a bundle in the registry (the hub's database and object store): checks
    /// every file against the manifest and the signature when there is one.
    Upload {
        /// Bundle folder.
        bundle: PathBuf,
        /// Sign it first with this private key file (writes `signature.json`).
        #[arg(long)]
        sign: Option<PathBuf>,
        /// Public keys a signature may be made with (`ed25519:<hex>` or a `.pub` file);
        /// repeat for several.
        #[arg(long)]
        trust: Vec<String>,
        #[command(flatten)]
        hub: crate::registry_cmd::HubArgs,
    },
    /// The bundles in the registry, with how many devices run and are assigned each.
    Registry {
        #[command(flatten)]
        hub: crate::registry_cmd::HubArgs,
    },
    /// One bundle of the registry: its fields, files and devices.
    Show {
        /// Bundle version.
        version: String,
        #[command(flatten)]
        hub: crate::registry_cmd::HubArgs,
    },
    /// Deletes a bundle from the registry (refused while any device runs or is assigned it).
    Delete {
        /// Bundle version.
        version: String,
        #[command(flatten)]
        hub: crate::registry_cmd::HubArgs,
    },
    /// Assigns a bundle to devices: a retained message on each one's model topic.
    Assign(crate::registry_cmd::AssignArgs),
}

/// Runs a `models` command.
pub async fn models(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::Sign { bundle, key } => crate::keys_cmd::sign_bundle(&bundle, &key)?,
        ModelsCommand::Upload {
            bundle,
            sign,
            trust,
            hub,
        } => {
            let row = crate::registry_cmd::upload(&hub, &bundle, sign.as_deref(), &trust).await?;
            println!(
                "uploaded {} ({}, {} bytes, manifest sha256 {}, {})",
                row.version,
                row.kind,
                row.size_bytes,
                row.manifest_sha256,
                row.signer_key_id
                    .map_or("unsigned".to_string(), |k| format!("signed by {k}"))
            );
        }
        ModelsCommand::Registry { hub } => crate::registry_cmd::list(&hub).await?,
        ModelsCommand::Show { version, hub } => crate::registry_cmd::show(&hub, &version).await?,
        ModelsCommand::Delete { version, hub } => {
            crate::registry_cmd::delete(&hub, &version).await?
        }
        ModelsCommand::Assign(args) => crate::registry_cmd::assign(&args).await?,
        ModelsCommand::List { api } => {
            let mut c = ModelsClient::new(channel(&api).await?);
            let list = c
                .list_models(ListModelsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let mut t = Table::new(&[
                "VERSION", "ROLE", "KIND", "BACKBONE", "INPUT", "BANK", "OK BELOW", "NG ABOVE",
                "MB", "DEVICES",
            ]);
            for m in list.models {
                t.row(vec![
                    m.version,
                    m.role,
                    m.kind,
                    m.backbone,
                    format!("{}x{}", m.input_width, m.input_height),
                    m.bank_rows.to_string(),
                    format!("{:.4}", m.ok_below),
                    format!("{:.4}", m.ng_above),
                    format!("{:.1}", m.size_bytes as f64 / 1e6),
                    m.devices.to_string(),
                ]);
            }
            print!("{}", t.render());
        }
        ModelsCommand::Fetch { version, out, api } => {
            let mut c = ModelsClient::new(channel(&api).await?);
            let mut stream = c
                .fetch_model(FetchModelRequest {
                    version: version.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
            while let Some(chunk) = stream.message().await.map_err(status)? {
                if let Err(reason) = insp_core::bundle::check_file_name(&chunk.file) {
                    anyhow::bail!("the hub sent a file named {:?}: {reason}", chunk.file);
                }
                let buf = files.entry(chunk.file.clone()).or_default();
                anyhow::ensure!(
                    buf.len() as u64 == chunk.offset,
                    "chunk of {} out of order",
                    chunk.file
                );
                buf.extend_from_slice(&chunk.data);
            }
            for (name, bytes) in &files {
                std::fs::write(out.join(name), bytes)?;
            }
            let verified = match insp_core::bundle::model_kind(&out)?.as_str() {
                "recon" | "flow" => {
                    insp_core::bundle::Bundle::<insp_cloud::heavy::HeavyParams>::open_kind(&out)
                        .map(|b| b.manifest.version)
                }
                _ => insp_core::patchcore::PatchCoreBundle::open_kind(&out)
                    .map(|b| b.manifest.version),
            };
            let fetched = verified.with_context(|| {
                format!("the fetched bundle in {} does not verify", out.display())
            })?;
            anyhow::ensure!(
                fetched == version,
                "fetched version {fetched} instead of {version}"
            );
            println!(
                "bundle {version} written to {} ({} files, hashes verified)",
                out.display(),
                files.len()
            );
        }
    }
    Ok(())
}
