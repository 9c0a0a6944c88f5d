//! MAGNeT, hybrid and rescored schedules through a real server: audio length, streaming of the
//! hybrid prefix, token equality with the model crate's own decode, batching across sessions,
//! and validation of every schedule field.

use std::path::PathBuf;

use anyhow::Result;
use cadenza_engine::{ModelEntry, ModelKind, Registry};
use cadenza_magnet::{DecodeParams, MagnetGeneration};
use cadenza_proto::v1 as pb;
use candle_core::Device;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::{TestServer, model};

/// A copy of the MusicGen fixture whose codec claims 24 kHz: loads fine, but its tokens are not
/// the MAGNeT model's (a rescorer / prefix model with a different codec).
fn musicgen_24k() -> Result<PathBuf> {
    let src = crate::fixtures().join("../musicgen/hf-tiny");
    let dst = std::env::temp_dir().join(format!("cadenza-mg24k-{}", std::process::id()));
    std::fs::create_dir_all(&dst)?;
    for f in [
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f))?;
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
    // Same weights at 24 kHz (bandwidth scaled so the codec keeps 4 quantizers).
    cfg["audio_encoder"]["sampling_rate"] = 24000.into();
    cfg["audio_encoder"]["target_bandwidths"] = serde_json::json!([1.0]);
    std::fs::write(dst.join("config.json"), cfg.to_string())?;
    Ok(dst)
}

/// The test config plus the embedded MAGNeT and the MusicGen whose T5 and codec it shares, and
/// a MusicGen with another codec.
fn magnet_config() -> Result<String> {
    Ok(format!(
        r#"{}
[[models]]
name = "musicgen24k"
kind = "music"
source = "{}"

[[models]]
name = "musicgen-tiny"
kind = "music"
source = "embedded:musicgen-tiny"

[[models]]
name = "magnet"
kind = "music"
source = "embedded:magnet-tiny"
[models.schedule]
prefix_model = "musicgen-tiny"
rescore_with = "musicgen-tiny"
"#,
        crate::test_config(""),
        musicgen_24k()?.display()
    ))
}

fn req(schedule: pb::Schedule, duration_s: f32) -> pb::GenerateMusicRequest {
    pb::GenerateMusicRequest {
        model: model("magnet"),
        prompt: "calm piano".into(),
        duration_s,
        sampling: Some(pb::Sampling {
            seed: 5,
            ..Default::default()
        }),
        chunk_ms: 100,
        return_tokens: true,
        schedule: Some(schedule),
        ..Default::default()
    }
}

fn magnet(steps: &[u32]) -> pb::Schedule {
    pb::Schedule {
        kind: pb::schedule::Kind::Magnet as i32,
        decoding_steps: steps.to_vec(),
        ..Default::default()
    }
}

#[derive(Debug, Default)]
struct Run {
    samples: Vec<f32>,
    /// Audio chunks and the progress stage seen last before each.
    chunks: Vec<String>,
    stages: Vec<String>,
    tokens: Option<pb::Codes>,
    fin: Option<pb::MusicFinal>,
}

async fn run(srv: &TestServer, r: pb::GenerateMusicRequest) -> Result<Run> {
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let mut s = c.generate(r).await?.into_inner();
    let mut out = Run::default();
    while let Some(m) = s.next().await {
        match m?.event.expect("an event") {
            pb::music_event::Event::Audio(a) => {
                assert_eq!(a.start_sample as usize, out.samples.len());
                assert!(!a.provisional);
                out.samples.extend(crate::from_f32le(&a.data));
                out.chunks
                    .push(out.stages.last().cloned().unwrap_or_default());
            }
            pb::music_event::Event::Progress(p) => {
                if out.stages.last() != Some(&p.stage) {
                    out.stages.push(p.stage);
                }
            }
            pb::music_event::Event::Tokens(t) => out.tokens = Some(t),
            pb::music_event::Event::Final(f) => out.fin = Some(f),
            pb::music_event::Event::Admitted(_) => {}
        }
    }
    Ok(out)
}

#[tokio::test]
async fn magnet_hybrid_and_rescored_return_audio_of_the_right_length() -> Result<()> {
    let srv = TestServer::start(&magnet_config()?).await?;
    // 1 s = 50 frames of 640 samples at 32 kHz; 50 is not a multiple of the span (3): the
    // sequence is decoded with 51 frames and cut.
    let m = run(&srv, req(magnet(&[4, 2, 2, 2]), 1.0)).await?;
    assert_eq!(m.samples.len(), 32000);
    let t = m.tokens.as_ref().expect("tokens");
    assert_eq!((t.num_codebooks, t.frames), (4, 50));
    assert_eq!(m.stages, ["magnet"]);
    assert_eq!(m.fin.as_ref().expect("final").model, "magnet");
    assert!(m.samples.iter().all(|x| x.is_finite()));

    // Hybrid: 0.4 s of autoregressive prefix (streamed before MAGNeT starts), then MAGNeT.
    let h = run(
        &srv,
        req(
            pb::Schedule {
                kind: pb::schedule::Kind::Hybrid as i32,
                decoding_steps: vec![3, 2, 2, 2],
                prefix_s: 0.4,
                ..Default::default()
            },
            1.0,
        ),
    )
    .await?;
    assert_eq!(h.samples.len(), 32000);
    assert_eq!(h.stages, ["ar", "magnet"]);
    assert!(
        h.chunks.iter().filter(|s| *s == "ar").count() >= 2,
        "the prefix streams in chunks: {:?}",
        h.chunks
    );
    assert_eq!(h.tokens.as_ref().expect("tokens").frames, 50);

    // Rescored by the MusicGen fixture: a rescoring pass between iterations.
    let mut s = magnet(&[3, 2, 2, 2]);
    s.rescore = Some(pb::Rescore {
        model: model("musicgen-tiny"),
        weight: 0.5,
        disabled: false,
    });
    let r = run(&srv, req(s, 0.6)).await?;
    assert_eq!(r.samples.len(), 30 * 640);
    assert!(r.stages.contains(&"rescore".to_string()), "{:?}", r.stages);

    // The model's default schedule (magnet, [20, 10, 10, 10]) with no schedule message.
    let mut d = req(magnet(&[]), 0.5);
    d.schedule = None;
    let d = run(&srv, d).await?;
    assert_eq!(d.samples.len(), 25 * 640);
    srv.stop().await
}

/// Greedy MAGNeT through the server gives exactly the tokens of `MagnetGeneration` run directly
/// on the same weights.
#[tokio::test]
async fn greedy_magnet_through_the_server_equals_the_direct_decode() -> Result<()> {
    let steps = [4u32, 3, 2, 2];
    let srv = TestServer::start(&magnet_config()?).await?;
    let mut r = req(magnet(&steps), 0.6);
    r.sampling = Some(pb::Sampling {
        greedy: true,
        seed: 1,
        ..Default::default()
    });
    let got = run(&srv, r).await?.tokens.expect("tokens");
    srv.stop().await?;

    let reg = Registry::load(
        &[ModelEntry {
            name: "m".into(),
            kind: ModelKind::Music,
            source: "embedded:magnet-tiny".into(),
            card: None,
            format: None,
            t5: None,
            codec: None,
            schedule: None,
            second_pass: None,
            decoding: None,
        }],
        None,
        &Device::Cpu,
    )
    .map_err(anyhow::Error::msg)?;
    let want = greedy_tiny_magnet(&reg, "calm piano", &steps)?;
    assert_eq!((got.num_codebooks, got.frames), (4, 30));
    assert_eq!(got.codes, want);
    Ok(())
}

/// Several greedy sessions at once: their MAGNeT iterations share forward passes (the batch
/// metric shows it) and give the same tokens as each alone.
#[tokio::test]
async fn batched_magnet_iterations_equal_solo() -> Result<()> {
    let srv = TestServer::start(&magnet_config()?).await?;
    let prompts = ["calm piano", "loud rock with drums", "jazz"];
    let mk = |p: &str| {
        let mut r = req(magnet(&[5, 3, 3, 3]), 0.6);
        r.prompt = p.into();
        r.sampling = Some(pb::Sampling {
            greedy: true,
            seed: 1,
            ..Default::default()
        });
        r
    };
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(run(&srv, mk(p)).await?.tokens.expect("tokens"));
    }
    let before = batched_steps(&srv);
    let together = futures::future::join_all(prompts.iter().map(|p| run(&srv, mk(p)))).await;
    for (t, s) in together.into_iter().zip(&solo) {
        assert_eq!(&t?.tokens.expect("tokens"), s);
    }
    assert!(
        batched_steps(&srv) > before,
        "no MAGNeT iteration ran batched:\n{}",
        srv.engine.metrics().render()
    );
    srv.stop().await
}

/// Sessions stepped in `magnet_iter` batches minus batches: > 0 once a batch held 2+ sessions.
fn batched_steps(srv: &TestServer) -> f64 {
    let text = srv.engine.metrics().render();
    let get = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("phase=\"magnet_iter\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    get("cadenza_batch_size_sum") - get("cadenza_batch_size_count")
}

#[tokio::test]
async fn invalid_schedules_are_rejected_naming_the_field() -> Result<()> {
    let srv = TestServer::start(&magnet_config()?).await?;
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let hybrid = |prefix_s: f32| pb::Schedule {
        kind: pb::schedule::Kind::Hybrid as i32,
        prefix_s,
        ..Default::default()
    };
    let rescore = |name: &str, weight: f32| pb::Schedule {
        kind: pb::schedule::Kind::Magnet as i32,
        rescore: Some(pb::Rescore {
            model: model(name),
            weight,
            disabled: false,
        }),
        ..Default::default()
    };
    let mut on_musicgen = req(magnet(&[]), 1.0);
    on_musicgen.model = model("musicgen-tiny");
    let mut ar_on_magnet = req(magnet(&[]), 1.0);
    ar_on_magnet.schedule = Some(pb::Schedule {
        kind: pb::schedule::Kind::Autoregressive as i32,
        ..Default::default()
    });
    let mut unknown_kind = req(magnet(&[]), 1.0);
    unknown_kind.schedule = Some(pb::Schedule {
        kind: 42,
        ..Default::default()
    });
    let mut other_prefix = req(hybrid(0.2), 1.0);
    if let Some(s) = other_prefix.schedule.as_mut() {
        s.prefix_model = model("musicgen24k");
    }
    let cases = [
        (req(magnet(&[0, 1, 1, 1]), 1.0), "schedule.decoding_steps"),
        (req(magnet(&[10, 10, 10]), 1.0), "schedule.decoding_steps"),
        (req(hybrid(1.0), 1.0), "schedule.prefix_s"),
        (req(hybrid(2.5), 1.0), "schedule.prefix_s"),
        (
            req(rescore("musicgen24k", 0.3), 1.0),
            "schedule.rescore.model",
        ),
        (req(rescore("nope", 0.3), 1.0), "schedule.rescore.model"),
        (req(rescore("magnet", 0.3), 1.0), "schedule.rescore.model"),
        (
            req(rescore("musicgen-tiny", 1.5), 1.0),
            "schedule.rescore.weight",
        ),
        (other_prefix, "schedule.prefix_model"),
        (on_musicgen, "schedule.kind"),
        (ar_on_magnet, "schedule.kind"),
        (unknown_kind, "schedule.kind"),
        (req(magnet(&[]), 40.0), "duration_s"),
    ];
    for (r, field) in cases {
        let st = match c.generate(r.clone()).await {
            Err(s) => s,
            Ok(resp) => {
                let mut s = resp.into_inner();
                loop {
                    match s.next().await {
                        Some(Err(e)) => break e,
                        Some(Ok(_)) => continue,
                        None => panic!("{r:?} was accepted"),
                    }
                }
            }
        };
        assert_eq!(st.code(), Code::InvalidArgument, "{field}: {st:?}");
        assert!(st.message().contains(field), "{field}: {}", st.message());
    }
    srv.stop().await
}

/// Rescored sessions running at the same time share the rescorer's forward passes (phase
/// `magnet_rescore`) and get exactly the tokens they get alone.
#[tokio::test]
async fn concurrent_rescored_sessions_equal_solo_ones() -> Result<()> {
    let srv = TestServer::start(&magnet_config()?).await?;
    let rescored = |prompt: &str, seed: u64| {
        let mut s = magnet(&[3, 2, 2, 2]);
        s.rescore = Some(pb::Rescore {
            model: model("musicgen-tiny"),
            weight: 0.3,
            disabled: false,
        });
        let mut r = req(s, 0.6);
        r.prompt = prompt.into();
        r.sampling = Some(pb::Sampling {
            seed,
            ..Default::default()
        });
        r
    };
    let reqs = [
        rescored("calm piano", 1),
        rescored("a fast rock song with loud drums", 2),
        rescored("folk tune on flute", 3),
    ];
    let mut solo = Vec::new();
    for r in &reqs {
        solo.push(run(&srv, r.clone()).await?.tokens.expect("tokens"));
    }
    let together = futures::future::try_join_all(reqs.iter().map(|r| run(&srv, r.clone()))).await?;
    for (t, s) in together.iter().zip(&solo) {
        assert_eq!(t.tokens.as_ref().expect("tokens"), s);
    }
    srv.stop().await
}

/// The registry's MAGNeT `m`, decoded greedily (seed 1, 30 frames) by the model crate itself.
fn greedy_tiny_magnet(reg: &Registry, prompt: &str, steps: &[u32]) -> Result<Vec<u32>> {
    let m = reg.music("m")?;
    let mg = m.magnet().expect("a MAGNeT model");
    let (ids, mask) = mg.tokenize(&[prompt])?;
    let cond = mg.condition(&ids, &mask)?;
    let mut g = MagnetGeneration::new(
        &mg.lm,
        &cond,
        None,
        DecodeParams {
            frames: 30,
            decoding_steps: steps.iter().map(|&s| s as usize).collect(),
            greedy: true,
            seed: 1,
            ..Default::default()
        },
    )?;
    while !g.is_done() {
        g.step(&mg.lm)?;
    }
    Ok(g.frames().iter().flatten().copied().collect())
}

/// magnet-tiny ships its own T5 directory (`models/pretrained/magnet-tiny/t5/`, the one it was
/// trained with): served from those files as a public audiocraft MAGNeT is (`format =
/// "audiocraft-magnet"`, `t5 = …`, `codec = …`), it decodes exactly as the embedded default, and
/// the caption changes the tokens (the T5 states reach the LM).
#[test]
fn magnet_tiny_files_serve_as_a_public_checkpoint_does() -> Result<()> {
    const STEPS: [u32; 4] = [3, 2, 2, 2];
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/pretrained");
    let entry = |source: String, t5: Option<String>, codec: Option<String>, format| ModelEntry {
        name: "m".into(),
        kind: ModelKind::Music,
        source,
        card: None,
        format,
        t5,
        codec,
        schedule: None,
        second_pass: None,
        decoding: None,
    };
    let path = |p: &str| Some(dir.join(p).display().to_string());
    let files = Registry::load(
        &[entry(
            dir.join("magnet-tiny").display().to_string(),
            path("magnet-tiny/t5"),
            path("magnet-tiny/codec"),
            Some("audiocraft-magnet".into()),
        )],
        None,
        &Device::Cpu,
    )
    .map_err(anyhow::Error::msg)?;
    let embedded = Registry::load(
        &[entry("embedded:magnet-tiny".into(), None, None, None)],
        None,
        &Device::Cpu,
    )
    .map_err(anyhow::Error::msg)?;
    let a = greedy_tiny_magnet(&files, "solo flute folk tune in D major at 100 bpm", &STEPS)?;
    assert_eq!(a.len(), 4 * 30);
    assert_eq!(
        a,
        greedy_tiny_magnet(
            &embedded,
            "solo flute folk tune in D major at 100 bpm",
            &STEPS
        )?
    );
    assert_ne!(
        a,
        greedy_tiny_magnet(&embedded, "organ chorale in G minor at 70 bpm", &STEPS)?
    );
    Ok(())
}

/// A MusicGen whose codec has magnet-tiny's configuration but other codebook entries (a codec
/// trained apart) is refused as magnet-tiny's prefix or rescoring model when the configuration
/// loads, naming the codebooks; the same files with the codec untouched are accepted. The
/// float16 files and the embedded model agree to the precision `same_codebooks` allows.
#[test]
fn a_prefix_model_on_another_codecs_codebooks_is_refused() -> Result<()> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/pretrained/musicgen-tiny");
    let copy = |name: &str, scale: f64| -> Result<PathBuf> {
        let dst = std::env::temp_dir().join(format!("cadenza-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dst)?;
        for f in ["config.json", "generation_config.json", "tokenizer.json"] {
            std::fs::copy(src.join(f), dst.join(f))?;
        }
        let mut t = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)?;
        for q in 0..4 {
            let k = format!("audio_encoder.quantizer.layers.{q}.codebook.embed");
            let e = &t[&k];
            let scaled = (e.to_dtype(candle_core::DType::F32)? * scale)?.to_dtype(e.dtype())?;
            t.insert(k, scaled);
        }
        candle_core::safetensors::save(&t, dst.join("model.safetensors"))?;
        Ok(dst)
    };
    let load = |prefix_dir: &PathBuf, field: &str| {
        let entry = |name: &str, source: String, schedule| ModelEntry {
            name: name.into(),
            kind: ModelKind::Music,
            source,
            card: None,
            format: None,
            t5: None,
            codec: None,
            schedule,
            second_pass: None,
            decoding: None,
        };
        let mut schedule = cadenza_engine::ScheduleDefaults::default();
        match field {
            "prefix_model" => {
                schedule.kind = Some("hybrid".into());
                schedule.prefix_model = Some("ar".into());
            }
            _ => schedule.rescore_with = Some("ar".into()),
        }
        Registry::load(
            &[
                entry("ar", prefix_dir.display().to_string(), None),
                entry("magnet", "embedded:magnet-tiny".into(), Some(schedule)),
            ],
            None,
            &Device::Cpu,
        )
    };
    let same = copy("mg-same", 1.0)?;
    let other = copy("mg-other", 1.05)?;
    for field in ["prefix_model", "rescore_with"] {
        load(&same, field).map_err(anyhow::Error::msg)?;
        let err = load(&other, field).expect_err("another codec's codebooks were accepted");
        assert!(
            err.contains(&format!("schedule.{field}")) && err.contains("codebook entries"),
            "{err}"
        );
    }
    for d in [same, other] {
        std::fs::remove_dir_all(d)?;
    }
    Ok(())
}
