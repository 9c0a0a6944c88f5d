#!/usr/bin/env bash
# Decoding cost of the shipped paraformer-tiny-en: greedy vs its decoding.yaml (beam 8, 6-gram
# LM, joint CTC) without and with its test-time VTLN (five warps), FunASR/PyTorch
# (BeamSearchPara with training/asr_lm.py's scorers; the warps as asr_eval.py's decode_warped)
# vs Cadenza, on the same weights and clip, one after the other in one run. Prints one JSON line
# per side.
#
#   tools/bench/paraformer_decoding.sh [WAV] [THREADS]
#
# Environment: PYTHON (default /work/venv/ref/bin/python, which has funasr), REPEATS (default 10),
# BIN (default: the release binary under $CARGO_TARGET_DIR or target/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
wav="${1:-${root}/tests/fixtures/heldout-speech/espeak-en-gb-x-rp-m6.wav}"
threads="${2:-1}"
repeats="${REPEATS:-10}"
python="${PYTHON:-/work/venv/ref/bin/python}"
bin="${BIN:-${CARGO_TARGET_DIR:-${root}/target}/release/cadenza}"
model="${root}/models/pretrained/paraformer-tiny-en"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
cp -r "${model}" "${tmp}/greedy" && rm "${tmp}/greedy/decoding.yaml"
cp -r "${model}" "${tmp}/beam" && sed -i 's/^vtln_warps:.*/vtln_warps: []/' "${tmp}/beam/decoding.yaml"
for m in greedy beam shipped; do
    dir="${tmp}/${m}"; [ "$m" = shipped ] && dir="${model}"
    RAYON_NUM_THREADS="${threads}" "${bin}" bench asr --model "${dir}" --input "${wav}" \
        --repeats "${repeats}" --json 2>/dev/null |
        "${python}" -c "import json,sys; d=json.load(sys.stdin); print(json.dumps(dict(impl='cadenza', decoding='$m', audio_s=d['audio_s'], offline_ms=round(d['offline_s']*1e3, 1), load_s=round(d['load_s'], 3), threads=$threads)))"
done
cd "${root}"
"${python}" - "${wav}" "${threads}" "${repeats}" <<'PY' 2>/dev/null | grep '^{'
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "training")
sys.path.insert(0, "training/eval")
from asr import load_paraformer
from asr_eval import decode_warped
import yaml
from asr_lm import funasr_beam_search
from common import load_audio
wav, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
md = Path("models/pretrained/paraformer-tiny-en")
m, fe, tok = load_paraformer(md)
w = torch.from_numpy(load_audio(wav, 16000))
warps = yaml.safe_load((md / "decoding.yaml").read_text()).get("vtln_warps") or []
beam = funasr_beam_search(md, tok.token_list, m)
for name, bs, ws in [("greedy", None, []), ("beam", beam, []), ("shipped", beam, warps)]:
    m.beam_search, m.nbest = bs, 1
    run = (lambda: decode_warped(m, fe, tok, w.float(), ws)) if ws else (
        lambda: m.inference([w], key=["u"], tokenizer=tok, frontend=fe, device="cpu"))
    with torch.no_grad():
        run()
        best = float("inf")
        for _ in range(repeats):
            t = time.time()
            run()
            best = min(best, time.time() - t)
    print(json.dumps(dict(impl="funasr", decoding=name, audio_s=round(len(w) / 16000, 3),
                          offline_ms=round(best * 1e3, 1), threads=threads)))
PY
