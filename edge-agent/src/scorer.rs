//! The scorer: one thread that takes frames off the queue, decodes and scores them with
//! the PatchCore model, puts each into its band and hands the messages to the outbox.
//! UNCERTAIN frames are escalated with their original bytes (lossless, native size) and
//! the edge map, so the hub reproduces the edge score exactly.
//!
//! The model can be replaced while running: a watcher thread loads and verifies a new
//! bundle off the frame path, and the scorer swaps it in between two frames. A bundle
//! that fails to verify is refused and the running model kept.

use crate::config::{AgentConfig, RoutingConfig};
use crate::decisions::{DecidedBy, Decision, DecisionBook};
use crate::frame::{unix_ms, unix_us, Frame, Handled};
use crate::outbox::{Envelope, Item, Outbox, Queue};
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use insp_core::memory_bank::Search;
use insp_core::patchcore::{PatchCore, Timings};
use insp_core::routing::{Band, Thresholds};
use insp_proto::v1::{self, AnomalyMap, Escalation, FrameResult};
use insp_proto::{Message, TopicKind};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A loaded model with the thresholds it routes by.
pub struct ActiveModel {
    /// The PatchCore model.
    pub model: PatchCore,
    /// OK / NG thresholds (the bundle's, or the configuration's overrides).
    pub thresholds: Thresholds,
}

impl ActiveModel {
    /// Opens and verifies a bundle, applying the configuration's search and threshold
    /// settings.
    pub fn load(config: &AgentConfig, device: &candle_core::Device) -> Result<ActiveModel> {
        let path = &config.model.bundle;
        let mut model = PatchCore::open(path, device).with_context(|| {
            format!(
                "cannot load the model bundle {} (make one with `edge-agent fit`)",
                path.display()
            )
        })?;
        model.set_exact_search(config.model.exact_search);
        if let Some(p) = config.model.probes {
            model.set_probes(p);
        }
        let thresholds = thresholds(model.manifest().thresholds, &config.routing)
            .with_context(|| format!("bundle {}", path.display()))?;
        Ok(ActiveModel { model, thresholds })
    }

    /// The bundle version.
    pub fn version(&self) -> &str {
        &self.model.manifest().version
    }
}

/// The bank search as sent with escalations, so the hub reproduces the score.
fn wire_search(search: Search) -> v1::BankSearch {
    match search {
        Search::Exact => v1::BankSearch::every_row(),
        Search::Probes(n) => v1::BankSearch::lists(n),
    }
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

/// Watches the bundle folder and sends verified new models to the scorer.
pub fn watch_bundle(
    config: AgentConfig,
    device: candle_core::Device,
    current: String,
) -> Option<Receiver<ActiveModel>> {
    if config.model.reload_check_s == 0 {
        return None;
    }
    let (tx, rx) = channel();
    let every = Duration::from_secs(config.model.reload_check_s);
    let spawned = std::thread::Builder::new()
        .name("bundle-watch".into())
        .spawn(move || {
            let mut known = current;
            loop {
                std::thread::sleep(every);
                let Some(version) = manifest_version(&config.model.bundle) else {
                    continue;
                };
                if version == known {
                    continue;
                }
                known = version.clone();
                match ActiveModel::load(&config, &device) {
                    Ok(m) => {
                        tracing::info!("bundle {version} verified; swapping it in");
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::error!(
                        "new bundle {version} refused, keeping the running model: {e:#}"
                    ),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("bundle watcher not started: {e}");
    }
    Some(rx)
}

/// The `version` field of a bundle's manifest, read cheaply.
fn manifest_version(bundle: &Path) -> Option<String> {
    let text = std::fs::read(bundle.join(insp_core::bundle::MANIFEST)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some(value.get("version")?.as_str()?.to_string())
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
}

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
            self.telemetry.set_model(next.version());
            self.active = next;
        }
    }

    /// Scores one frame and routes it.
    pub fn handle(&mut self, mut frame: Frame) {
        let origin = format!("frame {} ({})", frame.id, frame.source);
        let image = match insp_core::image::decode(&frame.bytes, &origin) {
            Ok(image) => image,
            Err(e) => {
                self.telemetry.frame_rejected();
                tracing::warn!("skipped: {e}");
                if let Some(reply) = frame.reply.take() {
                    let _ = reply.send(Handled::Rejected(e.to_string()));
                }
                return;
            }
        };
        let scored = match self
            .active
            .model
            .score_image(&image, &mut Timings::default())
        {
            Ok(s) => s,
            Err(e) => {
                self.telemetry.frame_rejected();
                tracing::error!("{origin}: scoring failed: {e}");
                if let Some(reply) = frame.reply.take() {
                    let _ = reply.send(Handled::Rejected(format!("scoring failed: {e}")));
                }
                return;
            }
        };
        let latency = frame.arrived.elapsed();
        self.telemetry.observe_score_latency(latency.as_secs_f64());
        let band = self.active.thresholds.band(scored.score);
        self.telemetry.frame_scored(band);
        let model_version = self.active.version().to_string();
        let result = FrameResult {
            site: self.site.clone(),
            device: self.device.clone(),
            frame_id: frame.id.to_string(),
            source: frame.source.clone(),
            captured_unix_ms: frame.captured_unix_ms,
            scored_unix_ms: unix_ms(),
            score: scored.score,
            band: wire_band(band) as i32,
            model_version: model_version.clone(),
            latency_ms: latency.as_secs_f32() * 1e3,
            // Numbered by the link as it publishes.
            delivery: None,
        };
        let arrived_unix_us = unix_us() - latency.as_micros() as i64;
        let decision = Decision {
            frame_id: frame.id,
            source: frame.source.clone(),
            edge_score: scored.score,
            edge_band: band,
            band,
            decided_by: (band != Band::Uncertain).then_some(DecidedBy::Edge),
            cloud_score: None,
            model_version,
        };
        // Register before publishing, so a fast verdict finds its frame waiting.
        self.book.scored(decision.clone());
        let mut escalated = true;
        if band == Band::Uncertain {
            let map = AnomalyMap {
                height: scored.map.height as u32,
                width: scored.map.width as u32,
                data: scored.map.data.clone(),
            };
            let mut escalation = Escalation {
                result: Some(result.clone()),
                frame_format: sniff_format(&frame.bytes),
                frame: std::mem::take(&mut frame.bytes),
                edge_map: Some(map),
                search: Some(wire_search(self.active.model.search())),
                delivery: None,
            };
            let mut payload = escalation.encode_to_vec();
            if payload.len() > self.max_payload {
                tracing::warn!("{origin}: escalation of {} bytes exceeds the {} byte payload limit; sending it without the edge map", payload.len(), self.max_payload);
                escalation.edge_map = None;
                payload = escalation.encode_to_vec();
            }
            if payload.len() > self.max_payload {
                self.telemetry.escalation_oversized();
                tracing::error!("{origin}: frame of {} bytes cannot be escalated within the {} byte payload limit (raise mqtt.max_payload_bytes and the broker's limit)", escalation.frame.len(), self.max_payload);
                escalated = false;
            } else {
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
        }
        self.outbox.send(Item {
            queue: Queue::Results,
            envelope: Envelope {
                topic: self.topics.0.clone(),
                arrived_unix_us,
                payload: result.encode_to_vec(),
            },
            on_durable: frame
                .reply
                .take()
                .map(|tx| (tx, Handled::Scored(decision.clone()))),
        });
        if !escalated {
            self.book
                .decide_now(frame.id, "escalation too large to send");
        }
    }
}

/// The wire form of a band.
pub fn wire_band(band: Band) -> v1::Band {
    match band {
        Band::Ok => v1::Band::Ok,
        Band::Uncertain => v1::Band::Uncertain,
        Band::Ng => v1::Band::Ng,
    }
}

/// Names the encoding of image bytes from their signature.
pub fn sniff_format(bytes: &[u8]) -> String {
    match image::guess_format(bytes) {
        Ok(image::ImageFormat::Png) => "png",
        Ok(image::ImageFormat::Jpeg) => "jpeg",
        Ok(image::ImageFormat::Bmp) => "bmp",
        Ok(image::ImageFormat::Tiff) => "tiff",
        _ => "unknown",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(sniff_format(b"\x89PNG\r\n\x1a\n...."), "png");
        assert_eq!(sniff_format(b"garbage"), "unknown");
    }
}
