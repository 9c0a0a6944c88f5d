#!/usr/bin/env python3
"""Train a small MAGNeT (audiocraft `MagnetLMModel`; audiocraft `state_dict.bin` + a T5 directory).

    nice -n 19 /work/venv/ref/bin/python training/magnet.py --data training/datasets \
        --codec training/runs/codec/model --out training/runs/magnet [--resume]

Same codec tokens (CODEC/../music_codes.pt) and caption tokenizer as musicgen.py. The text conditioner is a
small T5 encoder trained jointly (audiocraft's T5Conditioner keeps its T5 outside the state dict,
so the LM checkpoint holds only `...description.output_proj`, as for the public checkpoints).
Training follows audiocraft's MagnetSolver.run_step: one codebook stage per step, uniformly; codebooks
below it given, above it masked; the stage masked in spans of `span_len` at rate cos(pi/2 * u);
cross-entropy on the masked positions of that stage; 20% caption dropout for CFG. The span count
for a rate comes from audiocraft's table (MagnetSolver._calc_mean_maskrate_to_u_LUT: u distinct
starts mask 1 - C(T-L, u) / C(T, u) of the frames on average), so a rate near 1 masks nearly the
whole stage, as MAGNeT's first decoding step does. (Up to the eighth sitting the recipe drew
ceil(rate*T/span_len) starts with replacement, which masks at most ~63%: the first decoding step
was never trained. See training/README.md, "Eighth sitting".)
--init-from starts the LM from a trained one (e.g. under a new T5), --beat-crops and --beat-aux tie the
caption's tempo to the beat as musicgen.py's options do (the beat head reads the transformer's output
after its final norm, is trained only and is not exported).
Writes OUT/model/state_dict.bin (best_state + xp.cfg) and OUT/model/t5/ (config.json,
model.safetensors, tokenizer.json); serve with format = "audiocraft", t5 = .../t5, codec = the codec dir.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BeatAux, Trainer, base_args, build_caption_tokenizer, codec_tokens,  # noqa: E402
                    crop_start, encode_captions, import_audiocraft, read_manifest, seed_all, t5_config)

SPAN_LEN = 3


def xp_cfg(dim, heads, layers, n_q, card, seconds, t5_dim) -> dict:
    # audiocraft's MAGNeT config fields (solver/magnet/magnet_32khz.yaml, model/lm/default.yaml)
    return {
        "device": "cpu", "dtype": "float32", "sample_rate": 32000, "channels": 1,
        "compression_model_checkpoint": "cadenza:training/codec.py",
        "lm_model": "transformer_lm_magnet",
        "codebooks_pattern": {"modeling": "parallel", "parallel": {"empty_initial": 0}},
        "transformer_lm": {
            "dim": dim, "num_heads": heads, "num_layers": layers, "hidden_scale": 4, "n_q": n_q, "card": card,
            "dropout": 0.0, "emb_lr": None, "activation": "gelu", "norm_first": True, "bias_ff": False,
            "bias_attn": False, "bias_proj": False, "past_context": None, "causal": False, "custom": False,
            "memory_efficient": True, "attention_as_float32": False, "layer_scale": None,
            "positional_embedding": "sin", "xpos": False, "checkpointing": "none", "weight_init": "gaussian",
            "depthwise_init": "current", "zero_bias_init": True, "norm": "layer_norm", "cross_attention": False,
            "qk_layer_norm": False, "qk_layer_norm_cross": False, "attention_dropout": None, "kv_repeat": 1,
            "two_step_cfg": False, "subcodes_context": 5},
        "masking": {"span_len": SPAN_LEN},
        "classifier_free_guidance": {"training_dropout": 0.2, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
                  "cross": ["description"], "input_interpolate": []},
        "conditioners": {"description": {"model": "t5", "t5": {"name": "t5/", "finetune": False,
                                                                "word_dropout": 0.0, "normalize_text": False},
                                         "t5_dim": t5_dim}},
        "dataset": {"segment_duration": seconds, "sample_rate": 32000, "channels": 1},
        "generate": {"lm": {"use_sampling": True, "temp": 3.0, "top_k": 0, "top_p": 0.9, "max_cfg_coef": 10.0,
                            "min_cfg_coef": 1.0, "decoding_steps": [20, 10, 10, 10], "anneal_temp": True,
                            "span_scoring": "max", "span_arrangement": "nonoverlap"}},
    }


def build(ac, cfg, tok, t5, frame_rate):
    from audiocraft.models import lm_magnet

    cond = ac.conditioners

    class TrainableT5Conditioner(cond.TextConditioner):
        def __init__(self):
            super().__init__(t5.config.d_model, cfg["transformer_lm"]["dim"])
            self.t5 = t5  # registered here for training; export strips it (audiocraft keeps T5 outside)

        def tokenize(self, x):
            ids, mask = encode_captions(tok, [xi or "" for xi in x])
            mask = mask * torch.tensor([[1] if xi else [0] for xi in x])
            return {"input_ids": ids, "attention_mask": mask}

        def forward(self, inputs):
            mask = inputs["attention_mask"]
            h = self.t5(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
            return self.output_proj(h) * mask.unsqueeze(-1), mask

    kw = dict(cfg["transformer_lm"], memory_efficient=False, custom=True, cross_attention=True)
    fuser = cond.ConditionFuser(fuse2cond={k: cfg["fuser"][k] for k in ["sum", "cross", "prepend", "input_interpolate"]},
                                cross_attention_pos_emb=False, cross_attention_pos_emb_scale=1)
    provider = cond.ConditioningProvider({"description": TrainableT5Conditioner()}, device="cpu")
    lm = lm_magnet.MagnetLMModel(
        pattern_provider=ac.patterns.ParallelPatternProvider(kw["n_q"]), condition_provider=provider, fuser=fuser,
        cfg_dropout=0.0, cfg_coef=3.0, attribute_dropout={}, dtype=torch.float32, device="cpu",
        compression_model_framerate=frame_rate, segment_duration=cfg["dataset"]["segment_duration"],
        span_len=SPAN_LEN, **kw)
    # audiocraft pads the stage masks to a multiple of 8 for xformers; the plain attention path
    # needs them cut to the sequence length (as tools/fixtures/magnet.py does).
    full = list(lm.attn_mask_per_stage)
    base_forward = type(lm).__mro__[1].forward

    def forward(self, sequence, conditions, condition_tensors=None, stage=-1):
        S = sequence.shape[-1]
        self.attn_mask_per_stage = [None if m is None else m[..., :S, :S] for m in full]
        try:
            return base_forward(self, sequence, conditions, condition_tensors, stage)
        finally:
            self.attn_mask_per_stage = full

    lm.forward = forward.__get__(lm)
    return lm


def rate_to_spans(T: int, L: int = SPAN_LEN) -> list[int]:
    """For each masking percentage 0..100, the number u of distinct span starts whose mean masked
    fraction 1 - C(T-L, u) / C(T, u) first reaches it (audiocraft's MagnetSolver table, arXiv
    2401.04577 appendix C); the ratio is a running product, free of overflow."""
    mean, ratio = [0.0], (T - L) / T
    for u in range(1, T):
        mean.append(1.0 - ratio)
        ratio *= max(0.0, (T - L - u) / (T - u))
    out, u = [], 0
    for pct in range(101):
        while u < len(mean) and mean[u] < pct / 100.0:
            u += 1
        out.append(u)
    return out


def span_mask(B, T, gen, table=None, rate=None):
    """[B, T] bools: per row, rate cos(pi/2 * U(0,1)) (or the given rate), that many distinct span
    starts (from `table` = rate_to_spans(T)), each masking SPAN_LEN frames to its right."""
    table = table or rate_to_spans(T)
    if rate is None:
        rate = torch.cos(torch.rand(B, generator=gen) * math.pi / 2)
    else:
        rate = torch.full((B,), float(rate))
    k = torch.tensor([max(1, table[int(round(100 * float(r)))]) for r in rate])
    starts = torch.rand(B, T, generator=gen).argsort(-1) < k[:, None]
    m = starts.clone()
    for s in range(1, SPAN_LEN):
        m[:, s:] |= starts[:, :-s]
    return m


def main() -> int:
    p = base_args(__doc__, steps=2500, batch=16, ckpt_every=200)
    p.add_argument("--codec", type=Path, required=True)
    p.add_argument("--seconds", type=int, default=5, help="segment length = generation length (s)")
    p.add_argument("--t5-from", type=Path, default=None,
                   help="a MusicGen HF dir (musicgen.py's OUT/model): use its trained T5 and tokenizer, frozen "
                        "(audiocraft's MAGNeT also keeps its T5 frozen); then the served MAGNeT can share that "
                        "MusicGen's T5 and codec. Default: a new T5 trained jointly")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a magnet.py OUT/model dir (state_dict.bin): start the LM (not the T5) from its weights")
    p.add_argument("--beat-crops", type=float, default=0.0,
                   help="share of training segments that start on a beat of the clip (as musicgen.py)")
    p.add_argument("--beat-aux", type=float, default=0.0,
                   help="weight of an auxiliary loss: a linear head on the transformer's output predicts the beat "
                        "phase of every frame (as musicgen.py); 0 = off")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.ckpt_every, args.seconds = min(args.steps, 30), 4, 10, 2
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    from omegaconf import OmegaConf
    from transformers import EncodecConfig, T5EncoderModel

    ac = import_audiocraft()
    rows = read_manifest(args.data / "music" / "manifest.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    args.out.mkdir(parents=True, exist_ok=True)
    codes = codec_tokens(args.codec, rows, args.codec.parent / "music_codes.pt")  # shared with the other LM recipe
    cc = EncodecConfig.from_pretrained(args.codec)
    K, card, fr = cc.num_quantizers, cc.codebook_size, cc.frame_rate
    dim, layers = (64, 2) if args.smoke else (256, 4)
    if args.t5_from is not None:
        from tokenizers import Tokenizer
        from transformers import MusicgenForConditionalGeneration

        tok = Tokenizer.from_file(str(args.t5_from / "tokenizer.json"))
        t5 = MusicgenForConditionalGeneration.from_pretrained(args.t5_from).text_encoder
        t5.requires_grad_(False)
        t5.eval()
    else:
        tok = build_caption_tokenizer([r["text"] for r in rows], vocab_size=120 if args.smoke else 400)
        t5 = T5EncoderModel(t5_config(tok.get_vocab_size(), 64 if args.smoke else 128, 2))
    cfg = xp_cfg(dim, 4, layers, K, card, args.seconds, t5.config.d_model)
    lm = build(ac, cfg, tok, t5, fr)
    if args.init_from is not None and not args.resume:
        src = torch.load(args.init_from / "state_dict.bin", weights_only=False)["best_state"]
        own = lm.state_dict()
        take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
        lm.load_state_dict(take, strict=False)
        print(f"init-from {args.init_from}: {len(take)} of {len(own)} tensors (the rest: T5)", flush=True)
    opt = torch.optim.AdamW([q for q in lm.parameters() if q.requires_grad], lr=args.lr if args.lr != 1e-3 else 5e-4, weight_decay=0.01)
    args.lr = opt.param_groups[0]["lr"]
    tr = Trainer(args, lm, opt)
    beat = None
    hidden = {}
    if args.beat_aux > 0:
        beat = BeatAux(dim, tr, args.lr)
        # the transformer's output after out_norm, just before the per-codebook linears (lm.py forward)
        lm.out_norm.register_forward_hook(lambda _m, _i, out: hidden.__setitem__("h", out))
    rng = random.Random(args.seed + tr.step)
    gen = torch.Generator().manual_seed(args.seed + tr.step)
    T = args.seconds * fr
    table = rate_to_spans(T)
    Attr = ac.conditioners.ConditioningAttributes
    n_params = sum(p.numel() for p in lm.parameters())
    print(f"magnet: {n_params:,} parameters (LM + T5), {len(train)} train clips", flush=True)
    lm.train()
    if args.t5_from is not None:
        t5.eval()  # frozen: no dropout either
    while not tr.done():
        tr.lr_step()
        picks = [rng.choice(train) for _ in range(args.batch)]
        segs, starts = [], []
        for r in picks:
            c = codes[r["path"]]
            s = crop_start(r, c.shape[1], T, fr, rng, args.beat_crops)
            starts.append(s)
            seg = c[:, s: s + T]
            segs.append(torch.cat([seg, seg[:, -1:].expand(-1, T - seg.shape[1])], 1) if seg.shape[1] < T else seg)
        tokens = torch.stack(segs)  # [B, K, T]
        stage = rng.randint(0, K - 1)
        mask = torch.zeros(args.batch, K, T, dtype=torch.bool)
        sm = span_mask(args.batch, T, gen, table)
        mask[:, stage] = sm
        mask[:, stage + 1:] = True
        inp = torch.where(mask, lm.special_token_id, tokens)
        keep = torch.tensor([rng.random() >= 0.2 for _ in picks])
        conds = [Attr(text={"description": r["text"] if k else None}) for r, k in zip(picks, keep.tolist())]
        ct = lm.condition_provider(lm.condition_provider.tokenize(conds))
        logits = lm.compute_predictions(inp, [], ct, stage=stage).logits  # [B, K, T, card]
        loss = ce = F.cross_entropy(logits[:, stage][sm], tokens[:, stage][sm])
        metrics = dict(loss=ce.item(), stage=stage)
        if beat is not None:
            aux = beat.loss(hidden.pop("h"), picks, starts, keep, T, fr, lr=opt.param_groups[0]["lr"])
            loss = ce + args.beat_aux * aux
            metrics["beat_mse"] = aux.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if beat is not None:
            beat.step()
        tr.end_step(metrics, samples=args.batch)
    lm.eval()
    dst = args.out / "model"
    (dst / "t5").mkdir(parents=True, exist_ok=True)
    state = {k: v.clone().contiguous() for k, v in lm.state_dict().items() if ".description.t5." not in k}
    torch.save({"best_state": state, "xp.cfg": OmegaConf.to_yaml(OmegaConf.create(cfg)), "version": ac.version,
                "exported": True}, dst / "state_dict.bin")
    t5.save_pretrained(dst / "t5", safe_serialization=True)
    tok.save(str(dst / "t5" / "tokenizer.json"))
    # reload: a fresh LM from xp.cfg + state_dict.bin + t5/, then a short MAGNeT decode
    pkg = torch.load(dst / "state_dict.bin", weights_only=False)
    cfg2 = OmegaConf.to_container(OmegaConf.create(pkg["xp.cfg"]))
    lm2 = build(ac, cfg2, tok, T5EncoderModel.from_pretrained(dst / "t5"), fr)
    missing, unexpected = lm2.load_state_dict(pkg["best_state"], strict=False)
    assert not unexpected and all(".description.t5." in k for k in missing), (missing, unexpected)
    lm2.eval()
    test = [r for r in rows if r["split"] == "test"] or rows
    with torch.no_grad():
        out = lm2.generate(conditions=[Attr(text={"description": test[0]["text"]})], max_gen_len=T,
                           use_sampling=True, temp=3.0, top_p=0.9, decoding_steps=[4, 2, 2, 2][:K] + [2] * max(0, K - 4))
    summary = dict(tr.summary(), parameters_lm_plus_t5=n_params, prompt=test[0]["text"], generated=list(out.shape),
                   distinct_codes=int(out[0, 0].unique().numel()))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
