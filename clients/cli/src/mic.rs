//! Microphone capture for `cadenza asr --mic` (cpal; only in builds with the `mic` feature).

use anyhow::{Context, Result, bail};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use tokio::sync::mpsc;

/// A running capture: interleaved f32 chunks arrive on the receiver until this is dropped.
pub struct Capture {
    _stream: cpal::Stream,
    /// Device name.
    pub name: String,
    /// Capture rate in Hz.
    pub rate: u32,
    /// Interleaved channels.
    pub channels: u16,
}

/// Names of the host's input devices.
fn input_names(host: &cpal::Host) -> Vec<String> {
    host.input_devices()
        .map(|it| it.map(|d| d.to_string()).collect())
        .unwrap_or_default()
}

impl Capture {
    /// Opens `device` (by name) or the default input device at its default configuration.
    pub fn start(device: Option<&str>) -> Result<(Self, mpsc::Receiver<Vec<f32>>)> {
        let host = cpal::default_host();
        let dev = match device {
            Some(want) => host
                .input_devices()
                .context("listing input devices")?
                .find(|d| d.to_string() == want)
                .with_context(|| {
                    format!(
                        "no input device named '{want}' (input devices: {})",
                        list(&host)
                    )
                })?,
            None => host.default_input_device().with_context(|| {
                format!(
                    "no microphone: the audio host has no default input device (input devices: \
                     {}); pick one with --device NAME",
                    list(&host)
                )
            })?,
        };
        let name = dev.to_string();
        let sc = dev
            .default_input_config()
            .with_context(|| format!("input device '{name}' has no usable configuration"))?;
        let config = sc.config();
        let (tx, rx) = mpsc::channel::<Vec<f32>>(64);
        let err = |e| eprintln!("microphone error: {e}");
        // Drops audio rather than blocking the audio thread when the consumer lags.
        let stream = match sc.sample_format() {
            cpal::SampleFormat::F32 => dev.build_input_stream::<f32, _, _>(
                config,
                {
                    let tx = tx.clone();
                    move |d: &[f32], _| {
                        let _ = tx.try_send(d.to_vec());
                    }
                },
                err,
                None,
            ),
            cpal::SampleFormat::I16 => dev.build_input_stream::<i16, _, _>(
                config,
                {
                    let tx = tx.clone();
                    move |d: &[i16], _| {
                        let _ = tx.try_send(d.iter().map(|&x| x as f32 / 32768.0).collect());
                    }
                },
                err,
                None,
            ),
            cpal::SampleFormat::U16 => dev.build_input_stream::<u16, _, _>(
                config,
                {
                    let tx = tx.clone();
                    move |d: &[u16], _| {
                        let _ = tx
                            .try_send(d.iter().map(|&x| (x as f32 - 32768.0) / 32768.0).collect());
                    }
                },
                err,
                None,
            ),
            other => bail!("input device '{name}' delivers {other:?} samples (unsupported)"),
        }
        .with_context(|| format!("opening input device '{name}'"))?;
        stream
            .play()
            .with_context(|| format!("starting input device '{name}'"))?;
        Ok((
            Self {
                _stream: stream,
                name,
                rate: config.sample_rate,
                channels: config.channels,
            },
            rx,
        ))
    }
}

fn list(host: &cpal::Host) -> String {
    let n = input_names(host);
    if n.is_empty() {
        "none".into()
    } else {
        n.join(", ")
    }
}
