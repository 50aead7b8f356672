//! The scorer: one thread that takes frames off the queue, decodes and scores them with
//! the PatchCore model, has the [`crate::router`] band them and make their messages, and
//! hands those to the outbox.
//! UNCERTAIN frames are escalated with their original bytes (lossless, native size) and
//! the edge map, so the hub reproduces the edge score exactly.
//!
//! The model can be replaced while running: a watcher thread loads and verifies a new
//! bundle off the frame path, and the scorer swaps it in between two frames. A bundle
//! that fails to verify is refused and the running model kept.

use crate::config::{AgentConfig, RoutingConfig};
use crate::decisions::DecisionBook;
use crate::frame::{Frame, Handled};
use crate::outbox::{Envelope, Item, Outbox, Queue};
use crate::router::{route, Routable, Route, Unsent};
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use insp_core::patchcore::PatchCoreBundle;
use insp_core::patchcore::{PatchCore, Scored, Timings};
use insp_core::routing::Thresholds;
use insp_proto::clock::{unix_ms, unix_us};
use insp_proto::{Message, TopicKind};
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A loaded model with the thresholds it routes by.
pub struct ActiveModel {
    /// The PatchCore model.
    pub model: PatchCore,
    /// OK / NG thresholds (the bundle's, or the configuration's overrides).
    pub thresholds: Thresholds,
    /// Put back by a rollback assignment: reported as rolled back once swapped in.
    pub rollback: bool,
}

impl ActiveModel {
    /// Opens and verifies a bundle (its signature too, with `model.trusted_keys`), scores
    /// its golden frames ([`insp_core::golden::self_test`]), and applies the
    /// configuration's search and threshold settings.
    pub fn load(config: &AgentConfig, device: &candle_core::Device) -> Result<ActiveModel> {
        let path = &config.model.bundle;
        let keys = config.bundle_keys()?;
        let mut model = PatchCoreBundle::open_trusted(path, keys.as_ref())
            .and_then(|bundle| {
                // The golden frames are scored with the bundle's own search settings,
                // before the configuration's overrides.
                let model = PatchCore::from_bundle(&bundle, device)?;
                let checked = insp_core::golden::self_test(&model, &bundle)?;
                if checked > 0 {
                    tracing::info!(
                        "bundle {}: self-test passed, {checked} golden frames scored bit for bit as in its manifest",
                        bundle.manifest.version
                    );
                }
                Ok(model)
            })
            .with_context(|| {
                format!(
                    "cannot load the model bundle {} (make one with `edge-agent fit`{})",
                    path.display(),
                    if keys.is_some() {
                        " and sign it with `cloud-hub models sign` with a key of model.trusted_keys"
                    } else {
                        ""
                    }
                )
            })?;
        model.set_exact_search(config.model.exact_search);
        if let Some(p) = config.model.probes {
            model.set_probes(p);
        }
        let thresholds = thresholds(model.manifest().thresholds, &config.routing)
            .with_context(|| format!("bundle {}", path.display()))?;
        Ok(ActiveModel {
            model,
            thresholds,
            rollback: false,
        })
    }

    /// The bundle version.
    pub fn version(&self) -> &str {
        &self.model.manifest().version
    }
}

/// Why a bundle did not load, as a metric label: the signature check's kind
/// ([`insp_core::signing::SignatureError::kind`]), `self_test` (its golden frames do not
/// score as its manifest says) or `load` (files, manifest, model).
pub fn refusal_kind(error: &anyhow::Error) -> &'static str {
    error
        .chain()
        .find_map(|e| match e.downcast_ref::<insp_core::Error>() {
            Some(insp_core::Error::Signature { error, .. }) => Some(error.kind()),
            Some(insp_core::Error::SelfTest { .. }) => Some("self_test"),
            _ => None,
        })
        .unwrap_or("load")
}

/// The bundle's thresholds with the configuration's overrides.
fn thresholds(bundle: Option<Thresholds>, routing: &RoutingConfig) -> Result<Thresholds> {
    let t = match (bundle, routing.ok_below, routing.ng_above) {
        (_, Some(ok_below), Some(ng_above)) => Thresholds { ok_below, ng_above },
        (Some(t), ok, ng) => Thresholds {
            ok_below: ok.unwrap_or(t.ok_below),
            ng_above: ng.unwrap_or(t.ng_above),
        },
        (None, _, _) => anyhow::bail!(
            "the bundle has no calibrated thresholds: refit it, or set routing.ok_below and routing.ng_above"
        ),
    };
    anyhow::ensure!(
        t.ok_below <= t.ng_above,
        "routing.ok_below ({}) is above routing.ng_above ({})",
        t.ok_below,
        t.ng_above
    );
    Ok(t)
}

/// Watches the bundle folder and sends verified new models to the scorer (on `tx`;
/// false when `model.reload_check_s` is 0 and nothing watches). A new version
/// that does not load (a bundle copied file by file: the manifest first, the bank still
/// being written) is tried again at every check while its files change, and given up,
/// with one error, once they stayed as they were between two failed tries; the same
/// version is tried again if its files change later.
pub fn watch_bundle(
    config: AgentConfig,
    device: candle_core::Device,
    current: String,
    telemetry: Arc<Telemetry>,
    tx: Sender<ActiveModel>,
) -> bool {
    if config.model.reload_check_s == 0 {
        return false;
    }
    let every = Duration::from_secs(config.model.reload_check_s);
    let spawned = std::thread::Builder::new()
        .name("bundle-watch".into())
        .spawn(move || {
            let mut current = current;
            let mut reloads = Reloads::default();
            loop {
                std::thread::sleep(every);
                let Some(version) = manifest_version(&config.model.bundle) else {
                    continue;
                };
                if version == current {
                    continue;
                }
                let files = fingerprint(&config.model.bundle);
                if !reloads.worth_trying(&version, &files) {
                    continue;
                }
                match ActiveModel::load(&config, &device) {
                    Ok(m) => {
                        tracing::info!("bundle {version} verified; swapping it in");
                        current = version;
                        reloads = Reloads::default();
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if reloads.failed(&version, files) {
                            let kind = refusal_kind(&e);
                            tracing::error!(
                                reason = kind,
                                "new bundle {version} refused, keeping the running model (its files did not change since the last try; it is tried again when they do): {e:#}"
                            );
                            telemetry.bundle_refused(&version, kind, &format!("{e:#}"));
                        } else {
                            tracing::info!(
                                "new bundle {version} does not load yet (still being copied?); trying again at the next check: {e:#}"
                            );
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("bundle watcher not started: {e}");
        return false;
    }
    true
}

/// Name, size and modification time of every file in a bundle folder: what tells a
/// bundle still being copied from one that stays as it is.
type Fingerprint = Vec<(String, u64, Option<std::time::SystemTime>)>;

fn fingerprint(bundle: &Path) -> Fingerprint {
    let mut files: Fingerprint = std::fs::read_dir(bundle)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            meta.is_file().then(|| {
                (
                    entry.file_name().to_string_lossy().into_owned(),
                    meta.len(),
                    meta.modified().ok(),
                )
            })
        })
        .collect();
    files.sort();
    files
}

/// What the bundle watcher remembers of versions that did not load.
#[derive(Default)]
struct Reloads {
    /// The last failed try: the version and its files as they were.
    failed: Option<(String, Fingerprint)>,
    /// Given up on: this version with exactly these files.
    refused: Option<(String, Fingerprint)>,
}

impl Reloads {
    /// Whether `version` with `files` should be tried.
    fn worth_trying(&self, version: &str, files: &Fingerprint) -> bool {
        self.refused
            .as_ref()
            .is_none_or(|(v, f)| v != version || f != files)
    }

    /// Records a failed try; true when it is given up now (its files did not change
    /// since the previous failed try of the same version).
    fn failed(&mut self, version: &str, files: Fingerprint) -> bool {
        let unchanged = self
            .failed
            .as_ref()
            .is_some_and(|(v, f)| v == version && *f == files);
        if unchanged {
            self.refused = self.failed.take();
        } else {
            self.failed = Some((version.to_string(), files));
        }
        unchanged
    }
}

/// The `version` field of a bundle's manifest, read cheaply.
fn manifest_version(bundle: &Path) -> Option<String> {
    insp_core::bundle::ManifestHead::read(bundle)
        .ok()
        .map(|head| head.version)
}

/// Everything the scorer thread needs.
pub struct Scorer {
    /// The model in use.
    pub active: ActiveModel,
    /// New models from the bundle watcher.
    pub updates: Option<Receiver<ActiveModel>>,
    /// Site name.
    pub site: String,
    /// Device name.
    pub device: String,
    /// Where results and escalations go.
    pub outbox: Outbox,
    /// Final decisions.
    pub book: Arc<DecisionBook>,
    /// Metrics.
    pub telemetry: Arc<Telemetry>,
    /// Largest MQTT payload.
    pub max_payload: usize,
    /// Topics of results and escalations.
    pub topics: (String, String),
    /// The image decoder ([`insp_core::image::decode`]; tests put a failing one here).
    pub decode: Decoder,
    /// Camera faults told from the frames.
    pub camera: crate::camera::CameraWatch,
}

/// Decodes an encoded frame; `origin` names it in errors.
pub type Decoder = fn(&[u8], &str) -> insp_core::Result<image::DynamicImage>;

impl Scorer {
    /// Prepares a scorer for `config`'s device.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &AgentConfig,
        active: ActiveModel,
        updates: Option<Receiver<ActiveModel>>,
        outbox: Outbox,
        book: Arc<DecisionBook>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Scorer> {
        let (site, device) = (&config.device.site, &config.device.id);
        let topic = |k| insp_proto::topic(site, device, k).map_err(anyhow::Error::msg);
        telemetry.set_model(active.version());
        Ok(Scorer {
            active,
            updates,
            site: site.clone(),
            device: device.clone(),
            outbox,
            book,
            telemetry,
            max_payload: config.mqtt.max_payload_bytes,
            topics: (topic(TopicKind::Result)?, topic(TopicKind::Escalation)?),
            decode: insp_core::image::decode,
            camera: crate::camera::CameraWatch::new(config.camera.clone()),
        })
    }

    /// Scores frames until the queue closes.
    pub fn run(mut self, mut frames: mpsc::Receiver<Frame>) {
        while let Some(frame) = frames.blocking_recv() {
            self.telemetry.set_queue_depth(frames.len());
            self.swap_model();
            self.handle(frame);
        }
        tracing::info!("frame queue closed; scorer stopped");
    }

    fn swap_model(&mut self) {
        let Some(updates) = &self.updates else {
            return;
        };
        while let Ok(next) = updates.try_recv() {
            tracing::info!(
                "model {} replaced by {}",
                self.active.version(),
                next.version()
            );
            if next.rollback {
                self.telemetry.set_model_rolled_back(next.version());
            } else {
                self.telemetry.set_model(next.version());
            }
            self.active = next;
        }
    }

    /// Scores one frame and routes it.
    pub fn handle(&mut self, mut frame: Frame) {
        let origin = format!("frame {} ({})", frame.id, frame.source);
        let (scored, look) =
            match decode_and_score(self.decode, &self.active.model, &frame.bytes, &origin) {
                Ok(s) => s,
                Err(refusal) => {
                    self.refuse(&mut frame, &origin, refusal);
                    return;
                }
            };
        let latency = frame.arrived.elapsed();
        self.telemetry.observe_score_latency(latency.as_secs_f64());
        self.watch_camera(look, &origin);
        let routed = route(
            Routable {
                id: frame.id,
                source: &frame.source,
                bytes: std::mem::take(&mut frame.bytes),
                captured_unix_ms: frame.captured_unix_ms,
                scored_unix_ms: unix_ms(),
                latency_ms: latency.as_secs_f32() * 1e3,
            },
            &scored,
            &Route {
                site: &self.site,
                device: &self.device,
                model_version: self.active.version(),
                thresholds: self.active.thresholds,
                search: self.active.model.search(),
                max_payload: self.max_payload,
                disk_low: self.telemetry.disk_low(),
                camera_fault: self.camera.faulty(),
            },
        );
        self.telemetry.frame_scored(routed.band);
        let arrived_unix_us = unix_us() - latency.as_micros() as i64;
        // Register before publishing, so a fast verdict finds its frame waiting.
        self.book.scored(routed.decision.clone());
        if routed.map_left_out {
            tracing::warn!("{origin}: escalation exceeds the {} byte payload limit; sending it without the edge map", self.max_payload);
        }
        match &routed.unsent {
            Some(Unsent::DiskLow) => self.telemetry.disk_shed("escalations", 1),
            Some(Unsent::CameraFault) => self.telemetry.camera.frame_not_escalated(),
            Some(Unsent::Oversized { frame_bytes }) => {
                self.telemetry.escalation_oversized();
                tracing::error!("{origin}: frame of {frame_bytes} bytes cannot be escalated within the {} byte payload limit (raise mqtt.max_payload_bytes and the broker's limit)", self.max_payload);
            }
            None => {}
        }
        if let Some(payload) = routed.escalation {
            self.outbox.send(Item {
                queue: Queue::Escalations,
                envelope: Envelope {
                    topic: self.topics.1.clone(),
                    arrived_unix_us,
                    payload,
                },
                on_durable: None,
            });
        }
        self.outbox.send(Item {
            queue: Queue::Results,
            envelope: Envelope {
                topic: self.topics.0.clone(),
                arrived_unix_us,
                payload: routed.result.encode_to_vec(),
            },
            on_durable: frame
                .reply
                .take()
                .map(|tx| (tx, Handled::Scored(routed.decision.clone()))),
        });
        if let Some(unsent) = routed.unsent {
            self.book.decide_now(frame.id, unsent.reason());
        }
    }
}

impl Scorer {
    /// Feeds the camera watch one frame; logs and publishes what it raised or cleared.
    fn watch_camera(&mut self, look: crate::camera::FrameLook, origin: &str) {
        use crate::camera::Change;
        for change in self.camera.observe(look, unix_ms()) {
            match change {
                Change::Raised(fault, _) => tracing::warn!(
                    "camera fault {} raised at {origin}: its frames are not escalated until it clears",
                    fault.as_str()
                ),
                Change::Cleared(fault) => {
                    tracing::info!("camera fault {} cleared at {origin}", fault.as_str())
                }
            }
        }
        self.telemetry.camera.set_active(&self.camera.active());
        if self.camera.faulty() {
            self.telemetry.camera.frame_under_fault();
        }
    }

    /// Counts and logs a frame that was not scored, and tells its source why (a push gets
    /// an error, a watched file goes to `rejected/` with the reason).
    fn refuse(&self, frame: &mut Frame, origin: &str, refusal: Refusal) {
        self.telemetry.frame_rejected();
        let reason = match refusal {
            Refusal::Undecodable(e) => {
                tracing::warn!("skipped: {e}");
                e
            }
            Refusal::Failed(e) => {
                tracing::error!("{origin}: {e}");
                e
            }
            Refusal::Panicked(message) => {
                self.telemetry.scorer_panicked();
                tracing::error!(
                    "{origin}: the decoder or the model panicked ({message}); the frame is set aside and scoring goes on"
                );
                format!("the frame made the decoder or the model panic: {message}")
            }
        };
        if let Some(reply) = frame.reply.take() {
            let _ = reply.send(Handled::Rejected(reason));
        }
    }
}

/// Why a frame was not scored.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// It does not decode (empty, truncated, not an image, too large).
    Undecodable(String),
    /// The model returned an error.
    Failed(String),
    /// The decoder or the model panicked on it.
    Panicked(String),
}

/// Decodes and scores a frame. A panic in the decoder or the model (a crafted or damaged
/// image can trigger one in a third-party decoder) is caught and becomes a refusal, so a
/// poison frame never ends the scorer (nor, read again after a restart, crash-loops it).
fn decode_and_score(
    decode: Decoder,
    model: &PatchCore,
    bytes: &[u8],
    origin: &str,
) -> Result<(Scored, crate::camera::FrameLook), Refusal> {
    guarded(|| {
        let image = decode(bytes, origin).map_err(|e| Refusal::Undecodable(e.to_string()))?;
        let scored = model
            .score_image(&image, &mut Timings::default())
            .map_err(|e| Refusal::Failed(format!("scoring failed: {e}")))?;
        Ok((scored, crate::camera::FrameLook::of(&image)))
    })
}

/// Runs `f`, turning a panic into [`Refusal::Panicked`] with the panic's message.
fn guarded<T>(f: impl FnOnce() -> Result<T, Refusal>) -> Result<T, Refusal> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(Refusal::Panicked(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scorer with a real model (a small bundle fitted on synthetic textures), its
    /// spool in `dir`; returns it with its telemetry and a good frame's bytes.
    fn real_scorer(dir: &Path) -> (Scorer, Arc<Telemetry>, Vec<u8>) {
        use clap::Parser;
        #[derive(Parser)]
        struct Synth {
            #[command(flatten)]
            args: crate::synth_cmd::SynthArgs,
        }
        #[derive(Parser)]
        struct Fit {
            #[command(flatten)]
            args: crate::fit_cmd::FitArgs,
        }
        let (data, bundle) = (dir.join("data"), dir.join("bundle"));
        let p = |p: &Path| p.display().to_string();
        let synth = Synth::parse_from([
            "synth",
            "--out",
            &p(&data),
            "--size",
            "64",
            "--train",
            "8",
            "--test-good",
            "1",
            "--test-defect",
            "1",
        ]);
        crate::synth_cmd::run(synth.args).unwrap();
        let fit = Fit::parse_from([
            "fit",
            "--data",
            &p(&data),
            "--out",
            &p(&bundle),
            "--size",
            "64",
            "--bank-rows",
            "200",
        ]);
        crate::fit_cmd::run(fit.args, &candle_core::Device::Cpu).unwrap();
        let mut config = AgentConfig::default();
        config.device.id = "cam-t".into();
        config.model.bundle = bundle;
        let active = ActiveModel::load(&config, &candle_core::Device::Cpu).unwrap();
        let spools = crate::outbox::Spools::open(
            &dir.join("spool"),
            1 << 20,
            1 << 20,
            std::time::Duration::ZERO,
        )
        .unwrap();
        let telemetry = Arc::new(Telemetry::new());
        let (outbox, _writer) = Outbox::start(spools, None, telemetry.clone()).unwrap();
        let book = DecisionBook::new(
            Duration::from_secs(1),
            crate::config::Fallback::Ng,
            telemetry.clone(),
            None,
            None,
        );
        let scorer = Scorer::new(&config, active, None, outbox, book, telemetry.clone()).unwrap();
        let good = std::fs::read(data.join("test/good/0000.png")).unwrap();
        (scorer, telemetry, good)
    }

    fn frame(bytes: &[u8]) -> (Frame, tokio::sync::oneshot::Receiver<Handled>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let frame = Frame {
            id: uuid::Uuid::new_v4(),
            source: "poison.jpg".into(),
            bytes: bytes.to_vec(),
            captured_unix_ms: 0,
            arrived: std::time::Instant::now(),
            reply: Some(tx),
        };
        (frame, rx)
    }

    #[test]
    fn a_decoder_panic_rejects_the_frame_and_the_scorer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (mut scorer, telemetry, good) = real_scorer(dir.path());
        scorer.decode = |_, _| panic!("index out of bounds: the len is 1 but the index is 1");
        let (poison, reply) = frame(&good);
        scorer.handle(poison);
        match reply.blocking_recv().unwrap() {
            Handled::Rejected(reason) => {
                assert!(
                    reason.contains("panic") && reason.contains("index out of bounds"),
                    "{reason}"
                )
            }
            Handled::Scored(d) => panic!("scored: {d:?}"),
        }
        assert_eq!(telemetry.rejected(), 1);
        assert!(telemetry
            .render()
            .contains("insp_edge_scorer_panics_total 1"));
        // The same scorer scores the next frame.
        scorer.decode = insp_core::image::decode;
        let (next, reply) = frame(&good);
        scorer.handle(next);
        assert!(matches!(reply.blocking_recv().unwrap(), Handled::Scored(_)));
    }

    #[test]
    fn a_bundle_that_fails_is_retried_while_its_files_change_then_given_up_once() {
        let files = |n: u64| -> Fingerprint { vec![("bank.safetensors".into(), n, None)] };
        let mut r = Reloads::default();
        assert!(r.worth_trying("v2", &files(10)));
        assert!(!r.failed("v2", files(10)), "first failure: retried");
        assert!(r.worth_trying("v2", &files(20)));
        assert!(!r.failed("v2", files(20)), "the files changed: retried");
        assert!(r.worth_trying("v2", &files(20)));
        assert!(r.failed("v2", files(20)), "unchanged: given up now");
        assert!(!r.worth_trying("v2", &files(20)), "and not tried again");
        assert!(r.worth_trying("v2", &files(30)), "until its files change");
        assert!(r.worth_trying("v3", &files(20)), "or another version comes");
    }

    #[test]
    fn a_panic_while_scoring_becomes_a_refusal_with_its_message() {
        let got: Result<(), Refusal> = guarded(|| panic!("index out of bounds: the len is 1"));
        assert_eq!(
            got,
            Err(Refusal::Panicked(
                "index out of bounds: the len is 1".into()
            ))
        );
        let n = 3;
        let got: Result<(), Refusal> = guarded(|| panic!("formatted {n}"));
        assert_eq!(got, Err(Refusal::Panicked("formatted 3".into())));
        assert_eq!(guarded(|| Ok(7)), Ok(7));
    }

    #[test]
    fn overrides_replace_bundle_thresholds_and_must_be_ordered() {
        let bundle = Some(Thresholds {
            ok_below: 1.0,
            ng_above: 2.0,
        });
        let mut r = RoutingConfig::default();
        assert_eq!(thresholds(bundle, &r).unwrap(), bundle.unwrap());
        r.ng_above = Some(3.0);
        assert_eq!(thresholds(bundle, &r).unwrap().ng_above, 3.0);
        assert!(thresholds(None, &r).is_err());
        r.ok_below = Some(4.0);
        assert!(thresholds(None, &r).is_err(), "ok_below above ng_above");
    }
}
