#!/usr/bin/env bash
# Compare MusicGen decoder decode throughput (musicgen-small size, random weights):
# transformers/PyTorch MusicgenForCausalLM vs. Cadenza (candle), batch 1 and 8.
#
#   tools/bench/musicgen.sh [MODEL_DIR] [THREADS]
#
#   MODEL_DIR  where the random-weight model (~1.7 GB) and the conditioning live / are
#              created (default: /tmp/cadenza-bench-musicgen; keep it out of the repository)
#   THREADS    CPU threads for both implementations (default: $THREADS or 2)
#
# Environment: PYTHON (default /work/venv/ref/bin/python if present, else tools/.venv/bin/python,
# else python3), THREADS, STEPS (decode steps incl. the first, default 50), BATCHES (default
# "1 8"), REPEATS (best of, default 2), CARGO (default cargo).
#
# Both sides print one JSON line per batch {"impl", "batch", "frames_per_s", "step_ms", ...};
# one step = one frame (4 codebook tokens) per batch row, steady state over steps 1..
# (step 0 = BOS prefill + cross-attention K/V). The table shows cadenza / pytorch frames per
# second (> 1 means Cadenza is faster), then the batch-1 memory-bandwidth limit measured by
# the Cadenza example (weight bytes per step / measured bandwidth).
#
# The Cadenza side is built in the dev profile with cadenza-nn and cadenza-musicgen at
# opt-level 3 (passed with --config, Cargo.toml is unchanged): at the dev profile's opt-level 0
# for workspace crates the timings would not mean much.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"

model_dir="${1:-/tmp/cadenza-bench-musicgen}"
threads="${2:-${THREADS:-2}}"
steps="${STEPS:-50}"
batches="${BATCHES:-1 8}"
repeats="${REPEATS:-2}"
cargo="${CARGO:-cargo}"

if [[ -n "${PYTHON:-}" ]]; then
    python="${PYTHON}"
elif [[ -x /work/venv/ref/bin/python ]]; then
    python=/work/venv/ref/bin/python
elif [[ -x "${repo_root}/tools/.venv/bin/python" ]]; then
    python="${repo_root}/tools/.venv/bin/python"
else
    python="python3"
fi

if ! [[ "${threads}" =~ ^[1-9][0-9]*$ ]]; then
    echo "musicgen.sh: THREADS must be a positive integer, got '${threads}'" >&2
    exit 2
fi
if ! command -v "${python}" >/dev/null 2>&1; then
    echo "musicgen.sh: python interpreter '${python}' not found (set PYTHON=...)" >&2
    exit 2
fi
mkdir -p "${model_dir}"
model_dir="$(cd "${model_dir}" && pwd)"
case "${model_dir}/" in
    "${repo_root}"/*) echo "musicgen.sh: put MODEL_DIR outside the repository (1.7 GB)" >&2; exit 2 ;;
esac

# shellcheck disable=SC2086
echo "== PyTorch (transformers) — ${model_dir}, ${threads} thread(s)" >&2
torch_out="$("${python}" "${script_dir}/musicgen_torch.py" --out "${model_dir}" \
    --threads "${threads}" --steps "${steps}" --repeats "${repeats}" --batch ${batches})"
printf '%s\n' "${torch_out}" | grep -E '^\{' >&2 || true

echo "== Cadenza (candle)" >&2
cadenza_out="$(cd "${repo_root}" && RAYON_NUM_THREADS="${threads}" "${cargo}" run -q \
    -p cadenza-musicgen --example decoder_bench \
    --config 'profile.dev.package.cadenza-nn.opt-level=3' \
    --config 'profile.dev.package.cadenza-musicgen.opt-level=3' \
    -- "${model_dir}" --steps "${steps}" --repeats "${repeats}" --batch ${batches})"
printf '%s\n' "${cadenza_out}" | grep -E '^\{' >&2 || true

"${python}" - "${torch_out}" "${cadenza_out}" <<'PY'
import json
import sys


def rows(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


torch_rows, cad_rows = (rows(t) for t in sys.argv[1:3])
torch_by_b = {r["batch"]: r for r in torch_rows if r.get("impl") == "pytorch"}
cad_by_b = {r["batch"]: r for r in cad_rows if r.get("impl") == "cadenza"}
probe = next((r for r in cad_rows if r.get("probe") == "bandwidth"), None)
if not torch_by_b or not cad_by_b:
    sys.exit(f"musicgen.sh: missing results (pytorch: {sorted(torch_by_b)}, cadenza: {sorted(cad_by_b)})")

targets = {1: 1.2, 8: 1.5}
print("MusicGen decoder (musicgen-small size), frames/s of decode steps with KV cache, "
      f"threads: pytorch {next(iter(torch_by_b.values()))['threads']}, "
      f"cadenza {next(iter(cad_by_b.values()))['threads']}")
print(f"{'batch':>5} {'pytorch ms':>11} {'cadenza ms':>11} {'pytorch f/s':>12} {'cadenza f/s':>12} "
      f"{'cadenza/pytorch':>16} {'target':>7}")
for b in sorted(set(torch_by_b) & set(cad_by_b)):
    t, c = torch_by_b[b], cad_by_b[b]
    ratio = c["frames_per_s"] / t["frames_per_s"]
    tgt = targets.get(b)
    tgt_s = f">={tgt:g}x" if tgt else ""
    print(f"{b:5d} {t['step_ms']:11.1f} {c['step_ms']:11.1f} {t['frames_per_s']:12.2f} "
          f"{c['frames_per_s']:12.2f} {ratio:15.2f}x {tgt_s:>7}")
    if t.get("last_tokens_row0") != c.get("last_tokens_row0"):
        print(f"      note: last greedy tokens differ (pytorch {t.get('last_tokens_row0')}, "
              f"cadenza {c.get('last_tokens_row0')})")
if probe:
    print(f"bandwidth ({probe['threads']} threads): memcpy {probe['copy_gb_s']:.1f} GB/s (read+write), "
          f"read {probe['read_gb_s']:.1f} GB/s; weights per step {probe['weight_bytes_per_step'] / 1e9:.3f} GB "
          f"-> batch-1 limit {probe['limit_step_ms']:.1f} ms/step = {probe['limit_frames_per_s']:.2f} frames/s "
          f"at the read rate ({probe.get('limit_step_ms_at_copy_rate', float('nan')):.1f} ms at the memcpy rate)")
    if 1 in torch_by_b and 1 in cad_by_b:
        lim = probe["limit_step_ms"]
        print(f"batch 1 at the limit: pytorch {lim / torch_by_b[1]['step_ms']:.0%}, "
              f"cadenza {lim / cad_by_b[1]['step_ms']:.0%}")
PY
