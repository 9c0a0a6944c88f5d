//! Times candle's CPU matmul for the decoder's linear-layer shapes at small batch in several
//! weight layouts, to pick the fastest formulation of `x @ W^T` for decode steps.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run -p cadenza-musicgen --example matmul_probe -- [ROWS...]
//! ```
//! Each line: layout, rows, shape, ms per call and the weight-read rate (GB/s). The weights of
//! all layers together (~1.3 GB) are cycled so that they do not sit in the caches.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};

type Case<'a> = (
    &'static str,
    Box<dyn Fn(usize) -> candle_core::Result<Tensor> + 'a>,
);

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = if rows.is_empty() { vec![1, 8] } else { rows };
    // (out, in) of one layer's matrices, 24 copies of each so the set exceeds the L3 cache.
    let shapes = [(3072usize, 1024usize), (4096, 1024), (1024, 4096)];
    let copies = 24;
    for &(o, i) in &shapes {
        let ws = (0..copies)
            .map(|_| Tensor::randn(0f32, 0.02, (o, i), &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let wts = ws
            .iter()
            .map(|w| w.t()?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        for &m in &rows {
            let x = Tensor::randn(0f32, 1.0, (m, i), &dev)?;
            let xt = x.t()?.contiguous()?; // (i, m)
            let bytes = (o * i * 4 * copies) as f64;
            let time = |f: &dyn Fn(usize) -> candle_core::Result<Tensor>| -> Result<f64> {
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let t = Instant::now();
                    for c in 0..copies {
                        std::hint::black_box(f(c)?);
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                Ok(best)
            };
            let x2 = if m == 1 {
                Tensor::cat(&[&x, &x], 0)?
            } else {
                x.clone()
            };
            // Row blocks of W small enough (rows * cols <= 256) for gemm's horizontal (dot
            // product) kernel, spread over candle's barrier pool.
            let chunked = |c: usize, rows_per: usize| -> candle_core::Result<Tensor> {
                let w: &Tensor = &ws[c];
                let nblk = o.div_ceil(rows_per);
                let xt2 = x2.t()?;
                let out: Vec<std::sync::Mutex<Option<candle_core::Result<Tensor>>>> =
                    (0..nblk).map(|_| std::sync::Mutex::new(None)).collect();
                candle_core::utils::barrier_pool().execute_chunked(nblk, |r| {
                    for bi in r {
                        let lo = bi * rows_per;
                        let n = rows_per.min(o - lo);
                        let y = w.narrow(0, lo, n).and_then(|wb| wb.matmul(&xt2));
                        *out[bi].lock().unwrap() = Some(y);
                    }
                });
                let ys = out
                    .into_iter()
                    .map(|m| m.into_inner().unwrap().unwrap())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ys, 0)?.t()
            };
            let cases: [Case; 7] = [
                (
                    "dot blocks (rows*n<=256)",
                    Box::new(|c| chunked(c, 256 / x2.dim(0).unwrap())),
                ),
                ("blocks of 512 rows", Box::new(|c| chunked(c, 512))),
                ("x@W.t (Linear)", Box::new(|c| x.matmul(&ws[c].t()?))),
                ("x@Wt (pre-transposed)", Box::new(|c| x.matmul(&wts[c]))),
                ("(W@x.t).t", Box::new(|c| ws[c].matmul(&xt))),
                ("(W@x2.t).t", Box::new(|c| ws[c].matmul(&x2.t()?))),
                ("(Wt.t@x2.t).t", Box::new(|c| wts[c].t()?.matmul(&x2.t()?))),
            ];
            for (name, f) in cases.iter() {
                let s = time(f.as_ref())?;
                println!(
                    "{name:24} rows {m:2} ({o}x{i})  {:7.3} ms/call  {:6.1} GB/s",
                    s / copies as f64 * 1e3,
                    bytes / s / 1e9
                );
            }
        }
    }
    Ok(())
}
