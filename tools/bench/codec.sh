#!/usr/bin/env bash
# Compare EnCodec 24 kHz (full size, 24 kbps) encode/decode speed:
# transformers/PyTorch vs. Cadenza (candle).
#
#   tools/bench/codec.sh [MODEL_DIR] [THREADS]
#
#   MODEL_DIR  where the random-weight model + 10 s input live / are created
#              (default: /tmp/cadenza-bench-encodec24)
#   THREADS    CPU threads for both implementations (default: $THREADS or 2)
#
# Environment: PYTHON (interpreter; default tools/.venv/bin/python if present,
# else python3), THREADS, REPEATS (PyTorch timed runs, default 3), CARGO
# (default cargo).
#
# Both sides print one JSON line {"impl", "encode_s", "decode_s", "audio_s",
# "threads"}; the table shows the ratios torch_time / cadenza_time
# (> 1 means Cadenza is faster).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"

model_dir="${1:-/tmp/cadenza-bench-encodec24}"
threads="${2:-${THREADS:-2}}"
repeats="${REPEATS:-3}"
cargo="${CARGO:-cargo}"

if [[ -n "${PYTHON:-}" ]]; then
    python="${PYTHON}"
elif [[ -x "${repo_root}/tools/.venv/bin/python" ]]; then
    python="${repo_root}/tools/.venv/bin/python"
else
    python="python3"
fi

if ! [[ "${threads}" =~ ^[1-9][0-9]*$ ]]; then
    echo "codec.sh: THREADS must be a positive integer, got '${threads}'" >&2
    exit 2
fi
if ! command -v "${python}" >/dev/null 2>&1; then
    echo "codec.sh: python interpreter '${python}' not found (set PYTHON=...)" >&2
    exit 2
fi

mkdir -p "${model_dir}"
model_dir="$(cd "${model_dir}" && pwd)"

# Last line of stdout that looks like a JSON object.
json_line() { grep -E '^[[:space:]]*\{' | tail -n 1 || true; }

echo "== PyTorch (transformers) — ${model_dir}, ${threads} thread(s)" >&2
torch_out="$("${python}" "${script_dir}/encodec_torch.py" \
    --out "${model_dir}" --threads "${threads}" --repeats "${repeats}")"
torch_json="$(printf '%s\n' "${torch_out}" | json_line)"
if [[ -z "${torch_json}" ]]; then
    echo "codec.sh: no JSON line from encodec_torch.py; output was:" >&2
    printf '%s\n' "${torch_out}" >&2
    exit 1
fi
echo "${torch_json}" >&2

echo "== Cadenza (candle)" >&2
cadenza_out="$(cd "${repo_root}" && RAYON_NUM_THREADS="${threads}" "${cargo}" run --release -q -p cadenza-cli -- \
    bench codec --model "${model_dir}" --input "${model_dir}/input.safetensors" \
    --threads "${threads}" --json)"
cadenza_json="$(printf '%s\n' "${cadenza_out}" | json_line)"
if [[ -z "${cadenza_json}" ]]; then
    echo "codec.sh: no JSON line from 'cadenza bench codec'; output was:" >&2
    printf '%s\n' "${cadenza_out}" >&2
    exit 1
fi
echo "${cadenza_json}" >&2

"${python}" - "${torch_json}" "${cadenza_json}" <<'PY'
import json
import sys

torch_r, cad_r = (json.loads(s) for s in sys.argv[1:3])
for r in (torch_r, cad_r):
    missing = [k for k in ("impl", "encode_s", "decode_s", "audio_s", "threads") if k not in r]
    if missing:
        sys.exit(f"codec.sh: {r.get('impl', '?')} result lacks {missing}: {r}")

def ratio(a, b):
    return f"{a / b:.2f}x" if b > 0 else "n/a"

audio_s = float(torch_r["audio_s"])
print(f"EnCodec 24 kHz @ 24 kbps, {audio_s:g} s of audio, threads: "
      f"pytorch {torch_r['threads']}, cadenza {cad_r['threads']}")
if float(cad_r["audio_s"]) != audio_s:
    print(f"warning: audio_s differs (pytorch {audio_s}, cadenza {cad_r['audio_s']})")
print(f"{'':8} {'pytorch s':>10} {'cadenza s':>10} {'torch/cadenza':>14} {'cadenza RTF':>12}")
for op in ("encode", "decode"):
    t, c = float(torch_r[f"{op}_s"]), float(cad_r[f"{op}_s"])
    rtf = f"{c / audio_s:.3f}" if audio_s > 0 else "n/a"
    print(f"{op:8} {t:10.3f} {c:10.3f} {ratio(t, c):>14} {rtf:>12}")
PY
