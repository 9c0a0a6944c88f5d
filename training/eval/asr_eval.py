#!/usr/bin/env python3
"""CER / WER of a Paraformer directory on a speech manifest split, and on pocketsphinx-testdata.

    /work/venv/ref/bin/python training/eval/asr_eval.py --model DIR --manifest data/speech/manifest.jsonl \
        [--split test] [--limit 200] [--cadenza /root/.cache/cadenza-target/release/cadenza] [--real]

Decodes with the FunASR reference classes, with the beam search and n-gram LM of the directory's
`decoding.yaml` when it has one, and its `vtln_warps` (Cadenza's test-time VTLN) as
`Paraformer::recognize` decodes them: once per warp factor, the best score per token position
wins. With --cadenza, decodes with `cadenza asr --local --model DIR --json FILE` per clip. --real adds the LibriVox / cards clips of Debian's pocketsphinx-testdata
(real human speech; reported as it is). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load_audio, read_manifest  # noqa: E402
from asr import load_paraformer  # noqa: E402

PS = Path("/usr/share/pocketsphinx/test/data")


def norm(s: str) -> str:
    s = re.sub(r"[^a-z' ]", " ", s.lower())
    return re.sub(r" +", " ", s).strip()


def real_set() -> list[dict]:
    out = []
    for sub, trans in [("librivox", "transcription"), ("cards", "cards.transcription")]:
        d = PS / sub
        f = d / trans if (d / trans).exists() else next(iter(d.glob("*.transcription")), None)
        if f is None:
            continue
        for line in f.read_text().splitlines():
            m = re.match(r"(.*)\((\S+)\)\s*$", line.strip())
            if not m:
                continue
            name = m.group(2).split("/")[-1]
            wav = next(iter(d.glob(name + "*.wav")), None)
            if wav is not None:
                out.append(dict(path=str(wav), text=norm(re.sub(r"</?s>", "", m.group(1)))))
    return out


def score(refs, hyps) -> dict:
    import jiwer

    return dict(n=len(refs), wer=round(jiwer.wer(refs, hyps), 4), cer=round(jiwer.cer(refs, hyps), 4))


def warped_decodes(model, fe, tok, wave, warps: list[float]) -> list[dict]:
    """The utterance decoded under each VTLN warp factor of the mel banks: per warp with a
    prediction, its token ids (blank/sos/eos dropped), score per token position (the beam
    hypothesis's total score, or the greedy path's summed log-probability, over the predicted
    token count) and text. Warps whose predictor fires no token are left out."""
    from asr import warped_features
    from funasr.utils.postprocess_utils import sentence_postprocess

    out = []
    with torch.no_grad():
        feats, lens = warped_features(fe, [wave] * len(warps), warps)
        enc, el = model.encode(feats, lens)
        enc = enc[0] if isinstance(enc, tuple) else enc
        acoustic, token_num = model.calc_predictor(enc, el)[:2]
        n = token_num.round().long()
        dec = model.cal_decoder_with_predictor(enc, el, acoustic, n)[0]
        for k, a in enumerate(warps):
            if int(n[k]) < 1:
                continue
            am = dec[k, : n[k]]
            if model.beam_search is not None:
                hyp = model.beam_search(x=enc[k, : el[k]], am_scores=am, maxlenratio=0.0, minlenratio=0.0)[0]
                ids, score = hyp.yseq[1:-1].tolist(), float(hyp.score)
            else:
                ids, score = am.argmax(-1).tolist(), float(am.max(-1)[0].sum())
            ids = [i for i in ids if i not in (0, 1, 2)]
            out.append(dict(warp=a, token_ids=ids, score_per_token=score / int(n[k]),
                            text=sentence_postprocess(tok.ids2tokens(ids))[0]))
    return out


def decode_warped(model, fe, tok, wave, warps: list[float]) -> str:
    """Test-time VTLN as Cadenza's `Paraformer::recognize` with `vtln_warps`: of
    `warped_decodes`, the transcript with the best score per token position (the first factor
    wins a tie; "" when no warp predicts a token)."""
    best = (float("-inf"), "")
    for d in warped_decodes(model, fe, tok, wave, warps):
        if d["score_per_token"] > best[0]:
            best = (d["score_per_token"], d["text"])
    return best[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--cadenza", type=Path, default=None, help="decode with this cadenza binary instead")
    ap.add_argument("--real", action="store_true", help="also pocketsphinx-testdata (real speech)")
    ap.add_argument("--show", type=int, default=5)
    ap.add_argument("--hyps", type=Path, default=None, help="also write every (ref, hyp) pair here (JSON)")
    ap.add_argument("--greedy", action="store_true",
                    help="ignore the directory's decoding.yaml (argmax decoding, FunASR's default)")
    args = ap.parse_args()
    if args.greedy and (args.model / "decoding.yaml").exists():
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp()) / args.model.name
        shutil.copytree(args.model, tmp, ignore=shutil.ignore_patterns("decoding.yaml"))
        args.model = tmp
    torch.set_num_threads(2)
    rows = read_manifest(args.manifest, args.split)[: args.limit]
    if args.cadenza is None:
        model, fe, tok = load_paraformer(args.model)
        # the directory's decoding.yaml (beam search + n-gram LM), as Cadenza reads it
        from asr_lm import funasr_beam_search

        model.beam_search = funasr_beam_search(args.model, tok.token_list, model)
        model.nbest = 1
        import yaml

        dec = args.model / "decoding.yaml"
        warps = (yaml.safe_load(dec.read_text()) or {}).get("vtln_warps") if dec.exists() else None

    def decode(path: str) -> str:
        if args.cadenza is not None:
            r = subprocess.run([str(args.cadenza), "asr", "--local", "--model", str(args.model), "--json", path],
                               capture_output=True, text=True)
            try:
                return norm(json.loads(r.stdout.strip().splitlines()[-1]).get("text", ""))
            except Exception:
                return ""
        w = torch.from_numpy(load_audio(path, 16000))
        if warps:
            return norm(decode_warped(model, fe, tok, w.float(), warps))
        with torch.no_grad():
            res, _ = model.inference([w], key=["u"], tokenizer=tok, frontend=fe, device="cpu")
        return norm(res[0]["text"])

    report = {}
    hyps = [decode(r["path"]) for r in rows]
    refs = [r["text"] for r in rows]
    report[args.split] = score(refs, hyps)
    by_voice = {}
    for r, h in zip(rows, hyps):
        by_voice.setdefault(r.get("voice", "?"), ([], []))
        by_voice[r.get("voice", "?")][0].append(r["text"])
        by_voice[r.get("voice", "?")][1].append(h)
    report["by_voice"] = {v: score(a, b) for v, (a, b) in sorted(by_voice.items())}
    report["examples"] = [dict(ref=a, hyp=b) for a, b in list(zip(refs, hyps))[: args.show]]
    if args.real:
        rs = real_set()
        if rs:
            rh = [decode(r["path"]) for r in rs]
            report["pocketsphinx_testdata"] = score([r["text"] for r in rs], rh)
        else:
            report["pocketsphinx_testdata"] = "not installed (apt-get install pocketsphinx-testdata)"
    if args.hyps:
        args.hyps.write_text(json.dumps([dict(path=r["path"], ref=a, hyp=b) for r, a, b in zip(rows, refs, hyps)], indent=0))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
