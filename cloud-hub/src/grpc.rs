//! The gRPC API (tonic; services in `proto/proto/hub.proto`): devices, the review queue
//! with frames and maps, review labels, and model bundles. Every call carries an API
//! token (`authorization: Bearer insp_...`): none, a malformed, unknown, revoked or
//! expired one, or a disabled user's, is `UNAUTHENTICATED`; a role below the call's
//! ([`required_role`]) is `PERMISSION_DENIED`.

use crate::auth::{AuthError, Principal, Role};
use crate::config::HubConfig;
use crate::db::api::{DeviceRow, EscalationSummaryRow, ReviewRow};
use crate::db::Db;
use crate::models::EdgeBundles;
use crate::objects::Objects;
use crate::telemetry::Telemetry;
use insp_core::anomaly_map::AnomalyMap;
use insp_proto::hub::devices_server::{Devices, DevicesServer};
use insp_proto::hub::models_server::{Models, ModelsServer};
use insp_proto::hub::reviews_server::{Reviews, ReviewsServer};
use insp_proto::hub::*;
use insp_proto::v1::{AnomalyMap as WireMap, Band, DeviceMetrics};
use insp_proto::Message;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Largest gRPC message (an escalation with its frame and maps).
pub const MAX_MESSAGE: usize = 64 << 20;
/// Bytes per model chunk.
const CHUNK: usize = 1 << 20;

fn internal(e: anyhow::Error) -> Status {
    tracing::error!("gRPC: {e:#}");
    Status::internal(format!("{e:#}"))
}

/// The role each call needs: viewers read devices, escalations and verdicts; operators
/// also label; fleet managers also read and fetch models; admins may do everything.
pub fn required_role(call: &str) -> Role {
    match call {
        "SubmitReview" => Role::Operator,
        "ListModels" | "FetchModel" => Role::FleetManager,
        _ => Role::Viewer,
    }
}

/// The status of a refused credential or role.
pub fn refusal_status(e: &AuthError) -> Status {
    match e {
        AuthError::Forbidden { .. } => Status::permission_denied(e.to_string()),
        AuthError::UnknownRole(_) | AuthError::DamagedHash(_) => Status::internal(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

/// The services' shared state.
#[derive(Clone)]
pub struct Api {
    db: Db,
    telemetry: Arc<Telemetry>,
    objects: Objects,
    edge: Arc<EdgeBundles>,
    /// The cloud's own bundles (heavy and PatchCore fallback), served by version.
    cloud_bundles: Vec<PathBuf>,
}

/// A bundle's version and the files its manifest lists, of any model kind. A listed name
/// that is not a plain file name (a path, `..`) makes the bundle unservable: the API
/// never reads outside the bundle's folder ([`insp_core::bundle::ManifestHead`]).
fn bundle_files(dir: &std::path::Path) -> anyhow::Result<(String, Vec<String>)> {
    let head = insp_core::bundle::ManifestHead::read(dir)?;
    Ok((head.version, head.files.into_keys().collect()))
}

/// Where the API's connections come from.
pub enum Incoming {
    /// Plain TCP (loopback, or behind a TLS-terminating proxy).
    Plain(tokio::net::TcpListener),
    /// TLS ([`crate::tls`]).
    Tls(crate::tls::TlsListener),
}

/// Serves the API on `listener` until `stop` completes (then in-flight calls finish).
pub async fn serve(
    listener: Incoming,
    db: Db,
    objects: Objects,
    edge: Arc<EdgeBundles>,
    telemetry: Arc<Telemetry>,
    config: HubConfig,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let api = Api {
        db,
        telemetry,
        objects,
        edge,
        cloud_bundles: config
            .models
            .heavy_bundles
            .iter()
            .chain(&config.models.cloud_bundle)
            .cloned()
            .collect(),
    };
    let router = tonic::transport::Server::builder()
        .add_service(DevicesServer::new(api.clone()))
        .add_service(ReviewsServer::new(api.clone()).max_encoding_message_size(MAX_MESSAGE))
        .add_service(ModelsServer::new(api));
    let result = match listener {
        Incoming::Plain(l) => {
            router
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(l), stop)
                .await
        }
        Incoming::Tls(l) => {
            router
                .serve_with_incoming_shutdown(l.into_stream(), stop)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!("gRPC server stopped: {e}");
    }
}

impl Api {
    /// The authenticated caller of `r`, if their role allows `call`; else the refusal
    /// (counted in `hub_api_refused_total{code}` and logged).
    async fn authorize<T>(&self, r: &Request<T>, call: &str) -> Result<Principal, Status> {
        let header = r.metadata().get("authorization").map(|v| v.as_bytes());
        let outcome = match (crate::auth::bearer(header), client_certificate_name(r)) {
            (Ok(token), _) => self.db.authenticate_token(&token).await.map_err(internal)?,
            // No token, but a client certificate the TLS handshake verified against
            // `api.tls.client_ca_file`: its common name is the user.
            (Err(AuthError::Missing), Some(name)) => {
                self.db.certificate_user(&name).await.map_err(internal)?
            }
            (Err(e), _) => Err(e),
        };
        let checked = outcome.and_then(|p| p.require(required_role(call)).map(|()| p));
        checked.map_err(|e| {
            let status = refusal_status(&e);
            let code = match status.code() {
                tonic::Code::PermissionDenied => "permission_denied",
                tonic::Code::Unauthenticated => "unauthenticated",
                _ => "internal",
            };
            self.telemetry.api_refused(code);
            tracing::info!("gRPC {call} refused: {e}");
            status
        })
    }
}

/// The common name of the client certificate of `r`'s connection, verified in the TLS
/// handshake (only a listener with `api.tls.client_ca_file` asks for one); empty when it
/// has none.
fn client_certificate_name<T>(r: &Request<T>) -> Option<String> {
    let certs = r.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    Some(name)
}

fn label_status(e: crate::labels::LabelError) -> Status {
    use crate::labels::LabelError;
    match e {
        LabelError::Denied(a) => refusal_status(&a),
        LabelError::UnknownLabel(_) | LabelError::NoteTooLong(_) => {
            Status::invalid_argument(e.to_string())
        }
        LabelError::NoEscalation(_) => Status::not_found(e.to_string()),
        LabelError::Database(_) => {
            tracing::error!("gRPC: {e}");
            Status::internal(e.to_string())
        }
    }
}

fn device_msg(d: DeviceRow) -> Device {
    Device {
        site: d.site,
        device: d.device,
        status: d.status,
        model_version: d.model_version,
        agent_version: d.agent_version,
        first_seen_unix_ms: d.first_seen_unix_ms,
        last_seen_unix_ms: d.last_seen_unix_ms,
        frames: d.frames.max(0) as u64,
        escalations: d.escalations.max(0) as u64,
        metrics: d
            .metrics
            .and_then(|b| DeviceMetrics::decode(b.as_slice()).ok()),
    }
}

fn summary_msg(e: &EscalationSummaryRow) -> EscalationSummary {
    EscalationSummary {
        frame_id: e.frame_id.clone(),
        site: e.site.clone(),
        device: e.device.clone(),
        source: e.source.clone(),
        captured_unix_ms: e.captured_unix_ms,
        edge_score: e.edge_score,
        model_version: e.model_version.clone(),
        escalation_state: EscalationState::from(e.state) as i32,
        verdict: e.verdict.as_ref().map(|v| VerdictRecord {
            band: Band::from(v.band) as i32,
            fused: v.fused,
            // hub.proto's record has no absent value: NaN without a cloud score.
            cloud_score: v.cloud_score.unwrap_or(f32::NAN),
            edge_score_reported: v.edge_score_reported,
            edge_score_reproduced: v.edge_score_reproduced,
            edge_reproduced_exactly: v.edge_exact,
            member_versions: v.model_versions.clone(),
            decided_unix_ms: v.decided_unix_ms,
        }),
        reviews: e.reviews.max(0) as u32,
    }
}

fn review_msg(r: ReviewRow) -> Review {
    Review {
        id: r.id,
        frame_id: r.frame_id,
        review_label: ReviewLabel::from(r.label) as i32,
        operator: r.operator,
        note: r.note,
        created_unix_ms: r.created_unix_ms,
    }
}

#[tonic::async_trait]
impl Devices for Api {
    async fn list_devices(
        &self,
        r: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        self.authorize(&r, "ListDevices").await?;
        let devices = self.db.devices().await.map_err(internal)?;
        Ok(Response::new(ListDevicesResponse {
            devices: devices.into_iter().map(device_msg).collect(),
        }))
    }

    async fn get_device(&self, r: Request<GetDeviceRequest>) -> Result<Response<Device>, Status> {
        self.authorize(&r, "GetDevice").await?;
        let name = r.into_inner().device;
        match self.db.device(&name).await.map_err(internal)? {
            Some(d) => Ok(Response::new(device_msg(d))),
            None => Err(Status::not_found(format!("no device {name:?}"))),
        }
    }
}

#[tonic::async_trait]
impl Reviews for Api {
    async fn list_pending(
        &self,
        r: Request<ListPendingRequest>,
    ) -> Result<Response<ListPendingResponse>, Status> {
        self.authorize(&r, "ListPending").await?;
        let r = r.into_inner();
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        } as i64;
        let device = (!r.device.is_empty()).then_some(r.device.as_str());
        let rows = self
            .db
            .pending_reviews(device, limit)
            .await
            .map_err(internal)?;
        Ok(Response::new(ListPendingResponse {
            escalations: rows.iter().map(summary_msg).collect(),
        }))
    }

    async fn get_escalation(
        &self,
        r: Request<GetEscalationRequest>,
    ) -> Result<Response<EscalationDetail>, Status> {
        self.authorize(&r, "GetEscalation").await?;
        let r = r.into_inner();
        let Some(e) = self
            .db
            .escalation_summary(&r.frame_id)
            .await
            .map_err(internal)?
        else {
            return Err(Status::not_found(format!("no escalation {:?}", r.frame_id)));
        };
        let inferences = self.db.inferences(&e.frame_id).await.map_err(internal)?;
        let reviews = self.db.reviews(&e.frame_id).await.map_err(internal)?;
        let mut detail = EscalationDetail {
            summary: Some(summary_msg(&e)),
            frame_format: e.frame_format.clone(),
            error: e.error.clone().unwrap_or_default(),
            ..Default::default()
        };
        if !r.without_images {
            detail.frame = self.objects.get(&e.frame_key).await.map_err(internal)?;
            let keys = e
                .edge_map_key
                .iter()
                .map(|k| ("edge".to_string(), k.clone()))
                .chain(
                    inferences
                        .iter()
                        .filter_map(|i| i.map_key.clone().map(|k| (i.model.clone(), k))),
                );
            for (model, key) in keys {
                match self
                    .objects
                    .get(&key)
                    .await
                    .and_then(|b| AnomalyMap::from_npy(&b).map_err(anyhow::Error::msg))
                {
                    Ok(m) => detail.maps.push(MapData {
                        model,
                        map: Some(WireMap {
                            height: m.height as u32,
                            width: m.width as u32,
                            data: m.data,
                        }),
                    }),
                    Err(err) => tracing::warn!("map {key}: {err:#}"),
                }
            }
        }
        detail.inferences = inferences
            .into_iter()
            .map(|i| Inference {
                model: i.model,
                model_version: i.model_version,
                score: i.score,
                ok_below: i.ok_below,
                ng_above: i.ng_above,
                latency_ms: i.latency_ms,
                map_key: i.map_key.unwrap_or_default(),
            })
            .collect();
        detail.reviews = reviews.into_iter().map(review_msg).collect();
        Ok(Response::new(detail))
    }

    async fn submit_review(
        &self,
        r: Request<SubmitReviewRequest>,
    ) -> Result<Response<Review>, Status> {
        let who = self.authorize(&r, "SubmitReview").await?;
        let r = r.into_inner();
        // An unspecified or unknown label number reads as REVIEW_LABEL_UNSPECIFIED, which
        // the label's conversion refuses (INVALID_ARGUMENT).
        let review = crate::labels::submit(&self.db, &who, &r.frame_id, r.review_label(), &r.note)
            .await
            .map_err(label_status)?;
        Ok(Response::new(review_msg(review)))
    }
}

type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Models for Api {
    async fn list_models(
        &self,
        r: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        self.authorize(&r, "ListModels").await?;
        let edge = self.edge.clone();
        let found = tokio::task::spawn_blocking(move || edge.scan())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        for (m, dir) in &found {
            self.db
                .upsert_model(&crate::models::model_row(
                    m,
                    dir,
                    crate::domain::ModelRole::Edge,
                ))
                .await
                .map_err(internal)?;
        }
        let models = self.db.models().await.map_err(internal)?;
        Ok(Response::new(ListModelsResponse {
            models: models
                .into_iter()
                .map(|(m, devices)| ModelInfo {
                    version: m.version,
                    model_role: ModelRole::from(m.role) as i32,
                    kind: m.kind,
                    backbone: m.backbone,
                    input_height: m.input_height as u32,
                    input_width: m.input_width as u32,
                    bank_rows: m.bank_rows as u64,
                    ok_below: m.ok_below.unwrap_or(f64::NAN) as f32,
                    ng_above: m.ng_above.unwrap_or(f64::NAN) as f32,
                    created_unix: m.created_unix,
                    size_bytes: m.size_bytes as u64,
                    devices: devices as u32,
                    parent_version: m.parent_version.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        r: Request<FetchModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.authorize(&r, "FetchModel").await?;
        let version = r.into_inner().version;
        let cloud = self
            .cloud_bundles
            .iter()
            .find(|p| bundle_files(p).is_ok_and(|(v, _)| v == version))
            .cloned();
        let Some(dir) = cloud.or_else(|| self.edge.path(&version)) else {
            return Err(Status::not_found(format!(
                "no bundle of version {version:?}"
            )));
        };
        let (_, listed) = bundle_files(&dir).map_err(internal)?;
        let mut files = vec![insp_core::bundle::MANIFEST.to_string()];
        files.extend(listed);
        let stream = futures::stream::unfold(
            (dir, files.into_iter(), None::<(String, Vec<u8>, usize)>),
            |(dir, mut files, mut current)| async move {
                loop {
                    if let Some((name, bytes, offset)) = current.as_mut() {
                        if *offset < bytes.len() || (bytes.is_empty() && *offset == 0) {
                            let end = (*offset + CHUNK).min(bytes.len());
                            let chunk = ModelChunk {
                                file: name.clone(),
                                offset: *offset as u64,
                                file_size: bytes.len() as u64,
                                data: bytes[*offset..end].to_vec(),
                            };
                            *offset = end.max(1);
                            return Some((Ok(chunk), (dir, files, current)));
                        }
                    }
                    let name = files.next()?;
                    match tokio::fs::read(dir.join(&name)).await {
                        Ok(bytes) => current = Some((name, bytes, 0)),
                        Err(e) => {
                            let status = Status::internal(format!(
                                "cannot read {}: {e}",
                                dir.join(&name).display()
                            ));
                            return Some((Err(status), (dir, Vec::new().into_iter(), None)));
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_files_lists_plain_names_and_refuses_paths() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join(insp_core::bundle::MANIFEST);
        std::fs::write(
            &manifest,
            r#"{"version": "flow-1", "files": {"model.safetensors": "ab", "backbone.safetensors": "cd"}}"#,
        )
        .unwrap();
        let (version, mut files) = bundle_files(dir.path()).unwrap();
        files.sort();
        assert_eq!(version, "flow-1");
        assert_eq!(files, ["backbone.safetensors", "model.safetensors"]);
        for bad in ["../../etc/passwd", "..", "sub/file", ""] {
            std::fs::write(
                &manifest,
                format!(r#"{{"version": "x", "files": {{"{bad}": "ab"}}}}"#),
            )
            .unwrap();
            let err = bundle_files(dir.path()).unwrap_err().to_string();
            assert!(err.contains("not a plain file name"), "{bad}: {err}");
        }
        std::fs::write(&manifest, "{").unwrap();
        assert!(bundle_files(dir.path()).is_err());
    }
}
