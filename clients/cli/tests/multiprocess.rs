//! The worker protocol across processes: a worker `cadenza serve` with models and a front-end
//! `cadenza serve --upstream …` without any, on loopback. Requests through the front-end give
//! the same results as sent to the worker directly; errors pass through; a worker that dies
//! makes the front-end answer UNAVAILABLE.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_cadenza")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn cadenza(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .output()
        .expect("running cadenza")
}

fn serve(args: &[&str]) -> Proc {
    Proc(
        Command::new(exe())
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting cadenza serve"),
    )
}

/// Waits until `cadenza models --server url` lists `model`.
fn wait_listing(url: &str, model: &str) {
    let t = Instant::now();
    loop {
        let out = cadenza(&["models", "--server", url, "--json"]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(model) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{url} never listed {model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_front_end_forwards_to_a_worker_process() {
    let dir = std::env::temp_dir().join(format!("cadenza-mp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("worker.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
drain_timeout_s = 2
[engine]
max_active = 4
[[models]]
name = "codec24"
kind = "codec"
source = "{}"
[[models]]
name = "musicgen"
kind = "music"
source = "{}"
"#,
            fixtures().join("encodec/causal24").display(),
            fixtures().join("musicgen/hf-tiny").display()
        ),
    )
    .unwrap();
    let (wp, fp) = (free_port(), free_port());
    let worker_url = format!("http://127.0.0.1:{wp}");
    let front_url = format!("http://127.0.0.1:{fp}");
    let cfg_s = cfg.to_str().unwrap();
    let worker = serve(&[
        "--config",
        cfg_s,
        "--addr",
        &format!("127.0.0.1:{wp}"),
        "--metrics-addr",
        "off",
        "--worker-id",
        "w1",
    ]);
    let _front = serve(&[
        "--config",
        cfg_s,
        "--addr",
        &format!("127.0.0.1:{fp}"),
        "--metrics-addr",
        "off",
        "--upstream",
        &worker_url,
    ]);
    wait_listing(&worker_url, "musicgen");
    wait_listing(&front_url, "musicgen");

    // The same request through the front-end and directly: identical audio.
    let music = |url: &str, out: &Path| {
        cadenza(&[
            "music",
            "--server",
            url,
            "--model",
            "musicgen",
            "--duration",
            "0.5",
            "--seed",
            "3",
            "-o",
            out.to_str().unwrap(),
            "happy rock song",
        ])
    };
    let (a, b) = (dir.join("front.wav"), dir.join("direct.wav"));
    let o = music(&front_url, &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = music(&worker_url, &b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (wa, wb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(wa.len() > 1000);
    assert_eq!(wa, wb, "front-end and direct results are identical");

    // Streaming codec calls through the front-end equal direct ones.
    let enc = |url: &str, out: &Path| {
        cadenza(&[
            "codec",
            "encode",
            "--server",
            url,
            "--model",
            "codec24",
            a.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
    };
    let (ca, cb) = (dir.join("front.codes"), dir.join("direct.codes"));
    let o = enc(&front_url, &ca);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = enc(&worker_url, &cb);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // (Same tensors and metadata; the file's metadata order is not fixed.)
    let (fa, fb) = (std::fs::read(&ca).unwrap(), std::fs::read(&cb).unwrap());
    let (ta, tb) = (
        safetensors::SafeTensors::deserialize(&fa).unwrap(),
        safetensors::SafeTensors::deserialize(&fb).unwrap(),
    );
    assert_eq!(
        ta.tensor("codes").unwrap().data(),
        tb.tensor("codes").unwrap().data()
    );
    let meta = |b: &[u8]| {
        let (_, m) = safetensors::SafeTensors::read_metadata(b).unwrap();
        let mut v: Vec<_> = m
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        v.sort();
        v
    };
    assert_eq!(meta(&fa), meta(&fb));

    // Errors travel back: an unknown model is NOT_FOUND naming what exists.
    let o = cadenza(&[
        "music",
        "--server",
        &front_url,
        "--model",
        "nope",
        "-o",
        "/dev/null",
        "x",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nope") && err.contains("musicgen"), "{err}");

    // The worker goes away: the front-end answers UNAVAILABLE, not a hang.
    drop(worker);
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let o = music(&front_url, &dir.join("x.wav"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(err.contains("unavailable"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir);
}
