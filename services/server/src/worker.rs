//! `cadenza.v1.Worker`: what this process holds and how busy it is, for front-ends
//! (`proto/cadenza/v1/worker.proto`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cadenza_engine::Engine;
use cadenza_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::models::model_info;

/// The worker-protocol service.
#[derive(Debug, Clone)]
pub struct WorkerService {
    engine: Engine,
    id: String,
    serving: Arc<AtomicBool>,
}

impl WorkerService {
    /// `serving` turns true once warm-up is done and false when draining.
    pub fn new(engine: Engine, id: String, serving: Arc<AtomicBool>) -> Self {
        Self {
            engine,
            id,
            serving,
        }
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn info(
        &self,
        _request: Request<pb::WorkerInfoRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        let sat = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(pb::WorkerInfo {
            worker_id: self.id.clone(),
            models: self.engine.models().into_iter().map(model_info).collect(),
            load: sat(self.engine.load()),
            queued: sat(self.engine.queued()),
            capacity: sat(self.engine.capacity()),
            serving: self.serving.load(Ordering::SeqCst),
        }))
    }
}
