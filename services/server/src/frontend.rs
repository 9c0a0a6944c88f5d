//! Front-end mode: a server that loads no models and forwards every request to worker
//! processes over the worker protocol (`proto/cadenza/v1/worker.proto`).
//!
//! Each upstream is polled with `Worker/Info` (models, load, capacity, serving); a request goes
//! to a serving upstream that holds its model (an empty model name: any upstream with a model of
//! that kind) with the lowest load relative to its capacity, counting the calls this front-end
//! has in flight to it. Calls are forwarded unchanged, with `grpc-timeout` and
//! `cadenza-priority`; statuses come back as the upstream sent them. Dropping the client's call
//! drops the upstream call, which cancels the session there.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cadenza_proto::v1 as pb;
use futures::{Stream, StreamExt};
use tokio::sync::RwLock;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// One worker process.
#[derive(Debug)]
struct Upstream {
    url: String,
    channel: Channel,
    info: RwLock<Option<pb::WorkerInfo>>,
    inflight: AtomicUsize,
}

/// The set of upstream workers; cheap to clone.
#[derive(Debug, Clone)]
pub struct Upstreams {
    list: Arc<Vec<Upstream>>,
    max_message: usize,
}

/// Counts a call in flight to an upstream until dropped.
struct Inflight(Arc<Vec<Upstream>>, usize);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0[self.1].inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Upstreams {
    /// Connects lazily to every URL and starts polling their `Info` every `refresh`.
    pub fn new(urls: &[String], refresh: Duration, max_message: usize) -> anyhow::Result<Self> {
        let list = urls
            .iter()
            .map(|u| {
                let channel = Endpoint::from_shared(u.clone())?
                    .connect_timeout(Duration::from_secs(2))
                    .connect_lazy();
                Ok(Upstream {
                    url: u.clone(),
                    channel,
                    info: RwLock::new(None),
                    inflight: AtomicUsize::new(0),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let me = Self {
            list: Arc::new(list),
            max_message,
        };
        let poll = me.clone();
        tokio::spawn(async move {
            loop {
                poll.refresh().await;
                tokio::time::sleep(refresh).await;
            }
        });
        Ok(me)
    }

    /// Asks every upstream for its `Info` now.
    pub async fn refresh(&self) {
        for u in self.list.iter() {
            let mut c = pb::worker_client::WorkerClient::new(u.channel.clone());
            let mut req = Request::new(pb::WorkerInfoRequest {});
            req.set_timeout(Duration::from_secs(2));
            let info = match c.info(req).await {
                Ok(r) => Some(r.into_inner()),
                Err(e) => {
                    tracing::debug!(upstream = %u.url, error = %e, "upstream not reachable");
                    None
                }
            };
            *u.info.write().await = info;
        }
    }

    /// True when at least one upstream is serving.
    pub async fn any_serving(&self) -> bool {
        for u in self.list.iter() {
            if u.info.read().await.as_ref().is_some_and(|i| i.serving) {
                return true;
            }
        }
        false
    }

    /// Every model the serving upstreams hold (first upstream's description wins).
    pub async fn models(&self) -> Vec<pb::ModelInfo> {
        let mut out: Vec<pb::ModelInfo> = Vec::new();
        for u in self.list.iter() {
            if let Some(i) = u.info.read().await.as_ref().filter(|i| i.serving) {
                for m in &i.models {
                    if !out.iter().any(|o| o.name == m.name) {
                        out.push(m.clone());
                    }
                }
            }
        }
        out
    }

    /// The least loaded serving upstream holding `model` of `kind`.
    async fn pick(&self, kind: &str, model: &str) -> Result<(Channel, Inflight), Status> {
        let mut best: Option<(f64, usize)> = None;
        let mut names = Vec::new();
        for (i, u) in self.list.iter().enumerate() {
            let g = u.info.read().await;
            let Some(info) = g.as_ref().filter(|i| i.serving) else {
                continue;
            };
            let has = info
                .models
                .iter()
                .any(|m| m.kind == kind && (model.is_empty() || m.name == model));
            names.extend(
                info.models
                    .iter()
                    .filter(|m| m.kind == kind)
                    .map(|m| m.name.clone()),
            );
            if !has {
                continue;
            }
            let load = info.load as f64 + u.inflight.load(Ordering::SeqCst) as f64;
            let score = load / f64::from(info.capacity.max(1));
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, i));
            }
        }
        let Some((_, i)) = best else {
            names.sort();
            names.dedup();
            return Err(if names.is_empty() && !self.any_serving().await {
                Status::unavailable("no upstream worker is serving")
            } else {
                Status::not_found(format!(
                    "unknown {kind} model '{model}' (available on the workers: {})",
                    names.join(", ")
                ))
            });
        };
        self.list[i].inflight.fetch_add(1, Ordering::SeqCst);
        Ok((self.list[i].channel.clone(), Inflight(self.list.clone(), i)))
    }
}

impl Upstreams {
    /// Routes a client-streaming call: reads the first message (which names the model, via
    /// `model_of`), picks an upstream for it, and returns the call to forward there: the
    /// first message, then the rest of the client's stream, with the client's headers.
    async fn route_stream<M: Send + 'static>(
        &self,
        kind: &str,
        request: Request<Streaming<M>>,
        model_of: impl Fn(&M) -> Option<String>,
    ) -> Result<
        (
            Channel,
            Inflight,
            Request<impl Stream<Item = M> + Send + 'static>,
        ),
        Status,
    > {
        let (meta, mut stream) = split(request);
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("invalid config: the stream ended before its first message")
        })?;
        let model = model_of(&first).unwrap_or_default();
        let (ch, guard) = self.pick(kind, &model).await?;
        let input = futures::stream::once(async move { first }).chain(inbound(stream));
        Ok((ch, guard, forward(&meta, input)))
    }
}

/// Copies the headers that travel to the upstream (deadline, priority).
fn forward<T, U>(from: &Request<T>, msg: U) -> Request<U> {
    let mut req = Request::new(msg);
    for key in ["grpc-timeout", "cadenza-priority"] {
        if let Some(v) = from.metadata().get(key) {
            req.metadata_mut().insert(key, v.clone());
        }
    }
    req
}

/// An upstream's response stream, holding its in-flight count.
fn relay<T: Send + 'static>(s: Streaming<T>, guard: Inflight) -> BoxStream<T> {
    Box::pin(s.map(move |item| {
        let _keep = &guard;
        item
    }))
}

/// A client's request stream as the upstream's input: it ends when the client's stream ends
/// cleanly; after a client error it never ends, so the upstream sees a cancellation (when the
/// call is dropped), not a clean end of input.
fn inbound<T: Send + 'static>(s: Streaming<T>) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::unfold(s, |mut s| async move {
        match s.next().await {
            Some(Ok(m)) => Some((m, s)),
            None => None,
            Some(Err(_)) => futures::future::pending().await,
        }
    })
}

/// The Music service of a front-end.
#[derive(Debug, Clone)]
pub struct MusicProxy(pub Upstreams);

#[tonic::async_trait]
impl pb::music_server::Music for MusicProxy {
    type GenerateStream = BoxStream<pb::MusicEvent>;

    async fn generate(
        &self,
        request: Request<pb::GenerateMusicRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let (ch, guard) = self.0.pick("music", name(&request.get_ref().model)).await?;
        let mut c = pb::music_client::MusicClient::new(ch)
            .max_decoding_message_size(self.0.max_message)
            .max_encoding_message_size(self.0.max_message);
        let req = forward(&request, request.get_ref().clone());
        let s = c.generate(req).await?.into_inner();
        Ok(Response::new(relay(s, guard)))
    }
}

/// The Codec service of a front-end.
#[derive(Debug, Clone)]
pub struct CodecProxy(pub Upstreams);

impl CodecProxy {
    fn client(&self, ch: Channel) -> pb::codec_client::CodecClient<Channel> {
        pb::codec_client::CodecClient::new(ch)
            .max_decoding_message_size(self.0.max_message)
            .max_encoding_message_size(self.0.max_message)
    }
}

#[tonic::async_trait]
impl pb::codec_server::Codec for CodecProxy {
    async fn encode(
        &self,
        request: Request<pb::EncodeRequest>,
    ) -> Result<Response<pb::EncodeResponse>, Status> {
        let (ch, _guard) = self.0.pick("codec", name(&request.get_ref().model)).await?;
        let req = forward(&request, request.get_ref().clone());
        self.client(ch).encode(req).await
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let (ch, _guard) = self.0.pick("codec", name(&request.get_ref().model)).await?;
        let req = forward(&request, request.get_ref().clone());
        self.client(ch).decode(req).await
    }

    type StreamEncodeStream = BoxStream<pb::EncodeChunk>;

    async fn stream_encode(
        &self,
        request: Request<Streaming<pb::StreamEncodeRequest>>,
    ) -> Result<Response<Self::StreamEncodeStream>, Status> {
        let (ch, guard, req) = self
            .0
            .route_stream("codec", request, |m: &pb::StreamEncodeRequest| {
                m.config.as_ref().map(|c| name(&c.model).to_string())
            })
            .await?;
        let s = self.client(ch).stream_encode(req).await?.into_inner();
        Ok(Response::new(relay(s, guard)))
    }

    type StreamDecodeStream = BoxStream<pb::DecodeChunk>;

    async fn stream_decode(
        &self,
        request: Request<Streaming<pb::StreamDecodeRequest>>,
    ) -> Result<Response<Self::StreamDecodeStream>, Status> {
        let (ch, guard, req) = self
            .0
            .route_stream("codec", request, |m: &pb::StreamDecodeRequest| {
                m.config.as_ref().map(|c| name(&c.model).to_string())
            })
            .await?;
        let s = self.client(ch).stream_decode(req).await?.into_inner();
        Ok(Response::new(relay(s, guard)))
    }
}

/// The Recognition service of a front-end.
#[derive(Debug, Clone)]
pub struct RecognitionProxy(pub Upstreams);

impl RecognitionProxy {
    fn client(&self, ch: Channel) -> pb::recognition_client::RecognitionClient<Channel> {
        pb::recognition_client::RecognitionClient::new(ch)
            .max_decoding_message_size(self.0.max_message)
            .max_encoding_message_size(self.0.max_message)
    }
}

#[tonic::async_trait]
impl pb::recognition_server::Recognition for RecognitionProxy {
    async fn recognize(
        &self,
        request: Request<pb::RecognizeRequest>,
    ) -> Result<Response<pb::RecognizeResponse>, Status> {
        let model = request
            .get_ref()
            .config
            .as_ref()
            .map(|c| name(&c.model).to_string())
            .unwrap_or_default();
        let (ch, _guard) = self.0.pick("asr", &model).await?;
        let req = forward(&request, request.get_ref().clone());
        self.client(ch).recognize(req).await
    }

    type StreamingRecognizeStream = BoxStream<pb::RecognizeEvent>;

    async fn streaming_recognize(
        &self,
        request: Request<Streaming<pb::RecognizeClientMsg>>,
    ) -> Result<Response<Self::StreamingRecognizeStream>, Status> {
        use pb::recognize_client_msg::Msg;
        // The model is in the first message (the config); the upstream validates the rest.
        let (ch, guard, req) = self
            .0
            .route_stream("asr", request, |m: &pb::RecognizeClientMsg| match &m.msg {
                Some(Msg::Config(c)) => c.config.as_ref().map(|c| name(&c.model).to_string()),
                _ => None,
            })
            .await?;
        let s = self.client(ch).streaming_recognize(req).await?.into_inner();
        Ok(Response::new(relay(s, guard)))
    }
}

/// The model name of a request (empty = the upstream's default).
fn name(m: &Option<pb::ModelRef>) -> &str {
    m.as_ref().map_or("", |m| m.name.as_str())
}

/// Separates a streaming request's headers from its stream.
fn split<T>(request: Request<Streaming<T>>) -> (Request<()>, Streaming<T>) {
    let (meta, ext, stream) = request.into_parts();
    (Request::from_parts(meta, ext, ()), stream)
}

/// The Models service of a front-end: every model of the serving upstreams.
#[derive(Debug, Clone)]
pub struct ModelsProxy(pub Upstreams);

#[tonic::async_trait]
impl pb::models_server::Models for ModelsProxy {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let kind = request.into_inner().kind;
        let models = self
            .0
            .models()
            .await
            .into_iter()
            .filter(|m| kind.is_empty() || m.kind == kind)
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
