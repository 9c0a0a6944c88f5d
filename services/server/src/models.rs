//! `cadenza.v1.Models`: what this server has loaded.

use cadenza_engine::Engine;
use cadenza_proto::v1 as pb;
use tonic::{Request, Response, Status};

/// The model listing service.
#[derive(Debug, Clone)]
pub struct ModelsService {
    engine: Engine,
}

impl ModelsService {
    /// Wraps an engine.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl pb::models_server::Models for ModelsService {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let kind = request.into_inner().kind;
        let models = self
            .engine
            .models()
            .into_iter()
            .filter(|m| kind.is_empty() || m.kind.as_str() == kind)
            .map(model_info)
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

/// The API's description of a loaded model.
pub fn model_info(m: cadenza_engine::ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        name: m.name,
        kind: m.kind.as_str().into(),
        architecture: m.architecture,
        sample_rate_hz: m.sample_rate,
        channels: m.channels.into(),
        frame_rate: m.frame_rate,
        num_codebooks: m.num_codebooks as u32,
        codebook_size: m.codebook_size as u32,
        bandwidths_kbps: m.bandwidths_kbps,
        parameters: m.parameters,
        untrained: m.untrained,
        card: m.card,
        source: m.source,
    }
}
