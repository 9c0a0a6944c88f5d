#!/usr/bin/env bash
# Latency (batch 1) and throughput (batch 8) to generate 10 s of music with the four schedules:
# autoregressive (MusicGen LM), MAGNeT, hybrid (3 s AR prefix + MAGNeT) and MAGNeT rescored by
# the AR LM, on random weights at musicgen-small size (dim 1024, 24 layers, 16 heads, 4 x 2048)
# and a small size (dim 256, 4 layers), counting the forward passes each makes. LM time only
# (no T5, no codec decoding). See models/magnet/examples/schedules_bench.rs.
#
#   tools/bench/magnet.sh [THREADS]
#
# Environment: SIZES (default "tiny small"), BATCHES (default "1 8"), MEASURE_AR /
# MEASURE_MAGNET (time only that many AR steps / MAGNeT iterations and extrapolate; defaults
# 50/10 for tiny and 20/2 for small, to keep the run within minutes on 2 cores), CARGO.
#
# The example runs in the dev profile, where every dependency and the model crates are built at
# opt-level 3 (Cargo.toml), so no separate release build is needed.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
threads="${1:-${THREADS:-2}}"
cargo="${CARGO:-cargo}"
sizes="${SIZES:-tiny small}"
batches="${BATCHES:-1 8}"
cd "${repo_root}"
"${cargo}" build -q -p cadenza-magnet --example schedules_bench
bin="${CARGO_TARGET_DIR:-${repo_root}/target}/debug/examples/schedules_bench"
for size in ${sizes}; do
    if [[ "${size}" == small ]]; then ar="${MEASURE_AR:-20}"; mg="${MEASURE_MAGNET:-2}";
    else ar="${MEASURE_AR:-50}"; mg="${MEASURE_MAGNET:-10}"; fi
    # shellcheck disable=SC2086
    RAYON_NUM_THREADS="${threads}" "${bin}" --size "${size}" --seconds 10 --batch ${batches} \
        --measure-ar "${ar}" --measure-magnet "${mg}"
done | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
print("| size | schedule | batch | forwards (+ rescoring) | latency for 10 s | audio s / s | vs AR |")
print("|---|---|---|---|---|---|---|")
ar = {(r["size"], r["batch"]): r["latency_s"] for r in rows if r["schedule"] == "ar"}
for r in rows:
    f = str(r["forwards"]) + (" + %d" % r["rescore_forwards"] if r["rescore_forwards"] else "")
    x = ar.get((r["size"], r["batch"]))
    rel = "%.2fx" % (x / r["latency_s"]) if x else "-"
    est = " (extrapolated)" if r["extrapolated"] else ""
    print("| %s | %s | %d | %s | %.1f s%s | %.2f | %s |" % (r["size"], r["schedule"], r["batch"], f, r["latency_s"], est, r["audio_s_per_s"], rel))
'
