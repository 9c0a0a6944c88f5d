#!/usr/bin/env bash
# Paraformer-large-sized model (random weights: SAN-M encoder 50 blocks of 512, decoder 16
# blocks, 8404 tokens, ~220 M parameters, as FunASR's paraformer-zh config): real-time factor of
# FunASR/PyTorch vs. Cadenza (candle) on the same weights and audio, offline, plus Cadenza's
# streaming RTF and per-chunk partial latency.
#
#   tools/bench/paraformer.sh [MODEL_DIR] [THREADS] [SECONDS]
#
#   MODEL_DIR  where the model + input.wav are created (default /tmp/cadenza-bench-paraformer)
#   THREADS    CPU threads for both (default: $THREADS or 2)
#   SECONDS    input length (default 10)
#
# Environment: PYTHON (default /work/venv/ref/bin/python, which has funasr), REPEATS (default 3),
# STREAMS (concurrent paced streams for the latency measurement, default 8), CARGO (default cargo).
# Streaming runs the same weights as a ParaformerStreaming directory (MODEL_DIR/streaming). The release binary is built with `cargo build --release -p cadenza-cli`.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"
model_dir="${1:-/tmp/cadenza-bench-paraformer}"
threads="${2:-${THREADS:-2}}"
seconds="${3:-10}"
repeats="${REPEATS:-3}"
cargo="${CARGO:-cargo}"
python="${PYTHON:-/work/venv/ref/bin/python}"

if ! [[ "${threads}" =~ ^[1-9][0-9]*$ ]]; then
    echo "paraformer.sh: THREADS must be a positive integer, got '${threads}'" >&2
    exit 2
fi
if [[ ! -f "${model_dir}/model.pt" || ! -f "${model_dir}/input.wav" ]]; then
    echo "building the random paraformer-large model in ${model_dir} ..." >&2
    "${python}" "${script_dir}/paraformer_torch.py" build "${model_dir}" "${seconds}" >&2
fi
if [[ ! -f "${model_dir}/streaming/config.yaml" ]]; then
    "${python}" "${script_dir}/paraformer_torch.py" streaming "${model_dir}" >&2
fi
streams="${STREAMS:-8}"

(cd "${repo_root}" && "${cargo}" build --release -q -p cadenza-cli)
target="${CARGO_TARGET_DIR:-${repo_root}/target}"
bin="${target}/release/cadenza"

# funasr prints notices on stdout: keep the JSON line (the last one).
torch_json="$(OMP_NUM_THREADS="${threads}" "${python}" "${script_dir}/paraformer_torch.py" time "${model_dir}" "${threads}" "${repeats}" | tail -n 1)"
torch_stream_json="$(OMP_NUM_THREADS="${threads}" "${python}" "${script_dir}/paraformer_torch.py" time-streaming "${model_dir}" "${threads}" "${repeats}" | tail -n 1)"
rust_json="$(RAYON_NUM_THREADS="${threads}" CANDLE_NUM_THREADS="${threads}" "${bin}" bench asr \
    --model "${model_dir}" --streaming-model "${model_dir}/streaming" --streams "${streams}" \
    --input "${model_dir}/input.wav" --repeats "${repeats}" --json)"
echo "${torch_json}"
echo "${torch_stream_json}"
echo "${rust_json}"
"${python}" - "${torch_json}" "${rust_json}" "${torch_stream_json}" <<'PY'
import json, sys
t, r, ts = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"audio {r['audio_s']:.1f} s, {r['threads']} threads")
print(f"offline   funasr/pytorch {t['offline_s']:.3f} s (RTF {t['rtf']:.3f})   "
      f"cadenza {r['offline_s']:.3f} s (RTF {r['rtf']:.3f})   speed-up x{t['offline_s'] / r['offline_s']:.2f}")
kind = "chunked ParaformerStreaming [0,10,5]" if r["streaming_chunked"] else "re-decoding the utterance so far"
print(f"streaming cadenza {r['stream_s']:.3f} s (RTF {r['stream_rtf']:.3f}), {r['chunk_ms']} ms pushes, "
      f"{kind}; per-push time p50 {r['partial_latency_p50_s']:.3f} s p95 {r['partial_latency_p95_s']:.3f} s (one stream, unpaced)")
print(f"streaming funasr/pytorch {ts['stream_s']:.3f} s (RTF {ts['stream_rtf']:.3f}), per chunk p50 "
      f"{ts['chunk_p50_s']:.3f} s p95 {ts['chunk_p95_s']:.3f} s; speed-up x{ts['stream_s'] / r['stream_s']:.2f}")
print(f"{r['streams']} concurrent real-time streams: chunk end -> partial p50 "
      f"{r['concurrent_partial_latency_p50_s']:.3f} s p95 {r['concurrent_partial_latency_p95_s']:.3f} s "
      f"({r['concurrent_partials']} partials)")
PY
