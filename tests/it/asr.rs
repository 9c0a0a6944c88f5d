//! Speech recognition: the server, the in-process engine (what `cadenza asr --local` runs) and
//! the model itself give the same text; streams in small chunks end with the same finals;
//! every bad input gets a clear status.

use anyhow::Result;
use cadenza_audio::{Pcm, WavFormat};
use cadenza_engine::{AsrConfig, AsrEvent, AudioInput, RequestOptions};
use cadenza_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::{TestServer, model};

fn fixture_dir() -> std::path::PathBuf {
    crate::fixtures().join("../paraformer/tiny")
}

/// The tiny fixture's input wave (16 kHz mono), as a 16-bit WAV file and its decoded samples.
fn fixture_wav() -> Result<(Vec<u8>, Vec<f32>)> {
    let bytes = std::fs::read(fixture_dir().join("expected.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let wave: Vec<f32> = st
        .tensor("wave")?
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    wav_of(&wave)
}

fn wav_of(samples: &[f32]) -> Result<(Vec<u8>, Vec<f32>)> {
    let wav = cadenza_audio::encode_wav(&Pcm::new(16000, 1, samples.to_vec())?, WavFormat::I16)?;
    let decoded = cadenza_audio::decode(&wav, &Default::default())?;
    Ok((wav, decoded.samples))
}

fn offline(samples: &[f32]) -> Result<cadenza_paraformer::Transcript> {
    let m = cadenza_paraformer::Paraformer::load(fixture_dir(), &candle_core::Device::Cpu)?;
    Ok(m.recognize(samples)?)
}

async fn client(
    srv: &TestServer,
) -> Result<pb::recognition_client::RecognitionClient<tonic::transport::Channel>> {
    Ok(pb::recognition_client::RecognitionClient::new(
        srv.channel().await?,
    ))
}

fn file_request(audio: Vec<u8>, timestamps: bool) -> pb::RecognizeRequest {
    pb::RecognizeRequest {
        meta: None,
        config: Some(pb::RecognitionConfig {
            model: model("paraformer"),
            input: Some(pb::AudioFormat {
                encoding: pb::Encoding::File as i32,
                ..Default::default()
            }),
            timestamps,
            ..Default::default()
        }),
        audio,
    }
}

fn stream_config(interim: bool) -> pb::RecognizeClientMsg {
    pb::RecognizeClientMsg {
        msg: Some(pb::recognize_client_msg::Msg::Config(
            pb::StreamingRecognitionConfig {
                meta: None,
                config: Some(pb::RecognitionConfig {
                    model: model("paraformer"),
                    input: Some(pb::AudioFormat {
                        encoding: pb::Encoding::PcmS16le as i32,
                        sample_rate_hz: 16000,
                        channels: 1,
                    }),
                    interim_results: interim,
                    ..Default::default()
                }),
            },
        )),
    }
}

fn audio_msg(b: Vec<u8>) -> pb::RecognizeClientMsg {
    pb::RecognizeClientMsg {
        msg: Some(pb::recognize_client_msg::Msg::Audio(b)),
    }
}

/// Runs a stream of `msgs`; returns the events or the terminal status.
async fn stream(
    srv: &TestServer,
    msgs: Vec<pb::RecognizeClientMsg>,
) -> Result<Result<Vec<pb::RecognizeEvent>, tonic::Status>> {
    let mut c = client(srv).await?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for m in msgs {
            if tx.send(m).await.is_err() {
                return;
            }
        }
    });
    let mut events = Vec::new();
    let mut s = match c.streaming_recognize(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(st) => return Ok(Err(st)),
    };
    while let Some(ev) = s.next().await {
        match ev {
            Ok(e) => events.push(e),
            Err(st) => return Ok(Err(st)),
        }
    }
    Ok(Ok(events))
}

fn expect_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got Ok({v:?})"),
        Err(st) => {
            assert_eq!(st.code(), code, "message: {}", st.message());
            assert!(
                st.message().contains(needle),
                "'{}' should mention '{needle}'",
                st.message()
            );
        }
    }
}

#[tokio::test]
async fn server_engine_and_model_agree() -> Result<()> {
    let (wav, samples) = fixture_wav()?;
    let want = offline(&samples)?;
    assert!(!want.text.is_empty());
    let srv = TestServer::default().await?;
    // Through the server.
    let resp = client(&srv)
        .await?
        .recognize(file_request(wav.clone(), true))
        .await?
        .into_inner();
    assert_eq!(resp.model, "paraformer");
    assert_eq!(resp.segments.len(), 1, "{resp:?}");
    assert_eq!(resp.text, want.text);
    let seg = &resp.segments[0];
    assert!(seg.is_final && seg.stability == 1.0);
    assert_eq!(seg.words.len(), want.tokens.len());
    for (w, (t, [a, b])) in seg
        .words
        .iter()
        .zip(want.tokens.iter().zip(&want.timestamps))
    {
        assert_eq!(&w.text, t);
        assert!((w.start_s - *a as f32 / 1000.0).abs() < 1e-3, "{w:?}");
        assert!((w.end_s - *b as f32 / 1000.0).abs() < 1e-3, "{w:?}");
    }
    let usage = resp.usage.unwrap();
    assert!((usage.audio_seconds - samples.len() as f64 / 16000.0).abs() < 1e-6);
    // The recognition's time is counted: at least half the best of three direct decodes of the
    // clip (the last step, which runs it, was once left out: about a fifth of that was
    // reported).
    let model = cadenza_paraformer::Paraformer::load(fixture_dir(), &candle_core::Device::Cpu)?;
    let direct = (0..3)
        .map(|_| {
            let t = std::time::Instant::now();
            model.recognize(&samples).map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    println!(
        "compute_seconds {} vs direct {direct}",
        usage.compute_seconds
    );
    assert!(
        usage.compute_seconds >= 0.5 * direct,
        "{usage:?} vs {direct} s"
    );
    // In process (what `cadenza asr --local` runs).
    let cfg = AsrConfig {
        model: "paraformer".into(),
        ..AsrConfig::default()
    };
    let mut s = srv
        .engine
        .recognize(cfg, AudioInput::File(wav), RequestOptions::default())?;
    let mut texts = Vec::new();
    while let Some(ev) = s.events.recv().await {
        if let AsrEvent::Hypothesis(h) = ev? {
            assert!(h.is_final);
            assert_eq!(h.token_ids, want.token_ids);
            texts.push(h.text);
        }
    }
    assert_eq!(texts, vec![want.text.clone()]);
    srv.stop().await
}

#[tokio::test]
async fn streaming_in_small_chunks_gives_the_same_final() -> Result<()> {
    let (_, samples) = fixture_wav()?;
    let want = offline(&samples)?;
    let srv = TestServer::default().await?;
    let pcm = cadenza_audio::to_s16le(&samples);
    // 50 ms chunks (1600 bytes), with a flush marker half-way through? No: a flush would end the
    // segment early. Chunks only, then a clean half-close.
    let mut msgs = vec![stream_config(true)];
    msgs.extend(pcm.chunks(1600).map(|c| audio_msg(c.to_vec())));
    let events = stream(&srv, msgs).await??;
    use pb::recognize_event::Event;
    assert!(matches!(events[0].event, Some(Event::Admitted(_))));
    let hyps: Vec<&pb::Hypothesis> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Hypothesis(h)) => Some(h),
            _ => None,
        })
        .collect();
    let interim: Vec<_> = hyps.iter().filter(|h| !h.is_final).collect();
    // 1.33 s of audio: partials at 0.6 s and 1.2 s of features.
    assert!(interim.len() >= 2, "{hyps:?}");
    for (i, h) in interim.iter().enumerate() {
        assert_eq!(h.revision, i as u32);
        assert!((0.0..=1.0).contains(&h.stability));
        assert_eq!(h.pass, pb::hypothesis::Pass::Online as i32);
    }
    let finals: Vec<_> = hyps.iter().filter(|h| h.is_final).collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].text, want.text);
    assert_eq!(finals[0].revision, interim.len() as u32);
    let ep = events
        .iter()
        .position(|e| matches!(e.event, Some(Event::Endpoint(_))))
        .expect("an endpoint");
    if let Some(Event::Endpoint(e)) = &events[ep].event {
        assert_eq!(e.reason, "end_of_input");
    }
    match &events.last().unwrap().event {
        Some(Event::Final(f)) => {
            assert_eq!(f.segments, 1);
            assert_eq!(f.model, "paraformer");
        }
        other => panic!("last event {other:?}"),
    }
    // Two-pass (the configured offline model is the same one here): same text, marked as the
    // offline correction.
    let mut cfg = stream_config(false);
    if let Some(pb::recognize_client_msg::Msg::Config(c)) = &mut cfg.msg {
        c.config.as_mut().unwrap().two_pass = true;
    }
    let mut msgs = vec![cfg];
    msgs.extend(pcm.chunks(3200).map(|c| audio_msg(c.to_vec())));
    let events = stream(&srv, msgs).await??;
    let finals: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Hypothesis(h)) => Some(h),
            _ => None,
        })
        .collect();
    assert_eq!(finals.len(), 1, "no interim results were asked for");
    assert_eq!(finals[0].text, want.text);
    assert_eq!(
        finals[0].pass,
        pb::hypothesis::Pass::OfflineCorrection as i32
    );
    srv.stop().await
}

#[tokio::test]
async fn silence_between_utterances_splits_segments() -> Result<()> {
    let (_, wave) = fixture_wav()?;
    let mut audio = wave.clone();
    audio.extend(vec![0.0; 24000]);
    audio.extend(&wave);
    let (wav, samples) = wav_of(&audio)?;
    let srv = TestServer::default().await?;
    let resp = client(&srv)
        .await?
        .recognize(file_request(wav, false))
        .await?
        .into_inner();
    assert_eq!(resp.segments.len(), 2, "{resp:?}");
    for s in &resp.segments {
        let (a, b) = (
            (s.start_s * 16000.0).round() as usize,
            (s.end_s * 16000.0).round() as usize,
        );
        assert_eq!(s.text, offline(&samples[a..b])?.text, "{s:?}");
    }
    assert_eq!(resp.segments[0].start_s, 0.0);
    assert!(resp.segments[1].start_s > 1.33);
    srv.stop().await
}

#[tokio::test]
async fn bad_recognition_requests() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = client(&srv).await?;
    // Malformed audio, unary and streamed (3 bytes are not whole 16-bit samples).
    expect_status(
        c.recognize(file_request(b"not audio at all".repeat(8), false))
            .await,
        Code::InvalidArgument,
        "audio",
    );
    expect_status(
        stream(&srv, vec![stream_config(false), audio_msg(vec![1, 2, 3])]).await?,
        Code::InvalidArgument,
        "audio",
    );
    // Unknown model.
    let mut req = file_request(fixture_wav()?.0, false);
    req.config.as_mut().unwrap().model = model("nope");
    expect_status(c.recognize(req).await, Code::NotFound, "nope");
    // Audio before any config.
    expect_status(
        stream(&srv, vec![audio_msg(vec![0; 3200])]).await?,
        Code::InvalidArgument,
        "first message must carry the config",
    );
    // A config after audio.
    expect_status(
        stream(
            &srv,
            vec![
                stream_config(false),
                audio_msg(vec![0; 3200]),
                stream_config(false),
            ],
        )
        .await?,
        Code::InvalidArgument,
        "config was sent after",
    );
    // A stream that never ends: more than engine.max_audio_seconds (30 s in the test config).
    let mut msgs = vec![stream_config(false)];
    msgs.extend((0..32).map(|_| audio_msg(vec![0; 32000])));
    expect_status(
        stream(&srv, msgs).await?,
        Code::ResourceExhausted,
        "max_audio_seconds",
    );
    // FILE is not a streaming encoding.
    let mut cfg = stream_config(false);
    if let Some(pb::recognize_client_msg::Msg::Config(c)) = &mut cfg.msg {
        c.config.as_mut().unwrap().input.as_mut().unwrap().encoding = pb::Encoding::File as i32;
    }
    expect_status(
        stream(&srv, vec![cfg]).await?,
        Code::InvalidArgument,
        "config.input.encoding",
    );
    srv.stop().await
}

/// The chunked streaming fixture (`paraformer/tiny-streaming`, FunASR `ParaformerStreaming`)
/// served next to the offline one, configured as its `second_pass`.
fn streaming_server_config() -> String {
    let mut cfg = crate::test_config("");
    cfg.push_str(&format!(
        r#"
[[models]]
name = "paraformer-streaming"
kind = "asr"
source = "{}"
second_pass = "paraformer"
"#,
        crate::fixtures()
            .join("../paraformer/tiny-streaming")
            .display()
    ));
    cfg
}

fn streaming_fixture_wave() -> Result<Vec<f32>> {
    let bytes =
        std::fs::read(crate::fixtures().join("../paraformer/tiny-streaming/expected.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    Ok(st
        .tensor("wave")?
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Through the server, a streaming model gives one interim hypothesis per 600 ms chunk (each the
/// chunked model's tokens so far, as `StreamingRecognizer` yields them) and a final equal to the
/// model's own chunked recognition; with two-pass the final is the offline `second_pass` model's.
#[tokio::test]
async fn chunked_streaming_model_through_the_server() -> Result<()> {
    let (_, samples) = wav_of(&streaming_fixture_wave()?)?;
    let m = cadenza_paraformer::Paraformer::load(
        crate::fixtures().join("../paraformer/tiny-streaming"),
        &candle_core::Device::Cpu,
    )?;
    assert!(m.is_streaming());
    let want = m.recognize(&samples)?;
    assert!(!want.token_ids.is_empty());
    let mut rec = m.streaming();
    let mut want_partials = Vec::new();
    for c in samples.chunks(1600) {
        want_partials.extend(rec.push(c)?.into_iter().map(|p| p.transcript.text));
    }
    assert_eq!(rec.finish()?.transcript, want);
    assert!(want_partials.len() >= 3, "{want_partials:?}");

    let srv = TestServer::start(&streaming_server_config()).await?;
    let pcm = cadenza_audio::to_s16le(&samples);
    let cfg = |two_pass: bool, interim: bool| {
        let mut c = stream_config(interim);
        if let Some(pb::recognize_client_msg::Msg::Config(c)) = &mut c.msg {
            let rc = c.config.as_mut().unwrap();
            rc.model = model("paraformer-streaming");
            rc.two_pass = two_pass;
        }
        c
    };
    use pb::recognize_event::Event;
    let hyps = |events: &[pb::RecognizeEvent]| -> Vec<pb::Hypothesis> {
        events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Hypothesis(h)) => Some(h.clone()),
                _ => None,
            })
            .collect()
    };
    let mut msgs = vec![cfg(false, true)];
    msgs.extend(pcm.chunks(3200).map(|c| audio_msg(c.to_vec())));
    let h = hyps(&stream(&srv, msgs).await??);
    let interim: Vec<_> = h.iter().filter(|h| !h.is_final).collect();
    let got: Vec<String> = interim.iter().map(|h| h.text.clone()).collect();
    assert_eq!(got, want_partials);
    for (i, h) in interim.iter().enumerate() {
        assert_eq!(h.revision, i as u32);
        assert_eq!(h.pass, pb::hypothesis::Pass::Online as i32);
    }
    let finals: Vec<_> = h.iter().filter(|h| h.is_final).collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].text, want.text);
    assert_eq!(finals[0].pass, pb::hypothesis::Pass::Online as i32);

    // Two-pass: partials from the chunked model, the final from the offline `second_pass`.
    let offline_want = offline(&samples)?;
    let mut msgs = vec![cfg(true, true)];
    msgs.extend(pcm.chunks(3200).map(|c| audio_msg(c.to_vec())));
    let h = hyps(&stream(&srv, msgs).await??);
    assert_eq!(
        h.iter().filter(|h| !h.is_final).count(),
        want_partials.len()
    );
    let finals: Vec<_> = h.iter().filter(|h| h.is_final).collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0].text, offline_want.text);
    assert_eq!(
        finals[0].pass,
        pb::hypothesis::Pass::OfflineCorrection as i32
    );

    // Unary recognition of a file by the streaming model: the same final.
    let (wav, _) = wav_of(&samples)?;
    let mut req = file_request(wav, false);
    req.config.as_mut().unwrap().model = model("paraformer-streaming");
    let resp = client(&srv).await?.recognize(req).await?.into_inner();
    assert_eq!(resp.segments.len(), 1, "{resp:?}");
    assert_eq!(resp.text, want.text);
    srv.stop().await
}
