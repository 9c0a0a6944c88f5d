#!/usr/bin/env python3
"""Add residual codebooks to a trained codec (a higher bandwidth), keeping every existing token.

    /work/venv/ref/bin/python training/codec_rvq_extend.py --model models/pretrained/encodec-tiny \
        --data DATA --add 4 --out RUNS/codec_8q/model          # 1.6 kbps -> also 3.2 kbps

EnCodec trains its residual VQ with quantizer dropout, so one model serves several bandwidths
(`target_bandwidths`): the first n codebooks are a coarser code of the same latent. A codec trained
at one bandwidth can gain finer ones after the fact: with the encoder, decoder and the existing
codebooks frozen, each new stage is fitted, in order, to what the stages before it leave of the
encoder's output, by k-means (the fixed point that EnCodec's EMA codebook updates approach), on
random crops of the training clips (speech and music alternately, as `codec.py` draws them).
The decoder never saw the finer latents in training, so whether they help is measured, not
assumed (`training/eval/codec_eval.py --bandwidth`; `--unquantized` bounds what any bandwidth can
reach). `--model` may also be a training checkpoint (`RUNS/codec/ckpt.pt`, with `--filters`).

Writes OUT/{config.json, model.safetensors}: the source's weights and codebooks unchanged, the new
codebooks after them, `target_bandwidths` extended by one entry per added codebook group.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec import Crops, codec_config, export  # noqa: E402
from common import seed_all  # noqa: E402


def load(src: Path, filters: int):
    from transformers import EncodecModel

    if src.suffix == ".pt":  # a codec.py checkpoint: the model's state dict with its RVQ buffers
        state = torch.load(src, weights_only=False)["model"]
        n_q = sum(k.endswith(".codebook.embed") for k in state)  # 4, or 8 after codec.py --codebooks 8
        model = EncodecModel(codec_config(filters, codebooks=n_q))
        model.load_state_dict(state)
        return model.float().eval()
    return EncodecModel.from_pretrained(src).float().eval()


def residual(r: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """What one RVQ stage leaves: each frame less its nearest entry of `book`."""
    return r - book[torch.cdist(r, book).argmin(1)]


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; an emptied cluster restarts on the worst-fit point."""
    c = x[torch.randint(len(x), (1,), generator=gen)]
    d2 = torch.cdist(x, c).squeeze(1) ** 2
    for _ in range(1, k):
        nxt = x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]
        c = torch.cat([c, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).squeeze(1) ** 2)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        idx = dist.argmin(1)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # the points farthest from their centroid
            far = dist.gather(1, idx[:, None]).squeeze(1).topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF EncodecModel directory or codec.py ckpt.pt")
    ap.add_argument("--filters", type=int, default=12, help="with a ckpt.pt: codec.py's --filters")
    ap.add_argument("--data", type=Path, required=True, help="the data root codec.py trained on")
    ap.add_argument("--add", type=int, default=4, help="codebooks to add")
    ap.add_argument("--group", type=int, default=4, help="codebooks per added bandwidth step")
    ap.add_argument("--crops", type=int, default=512, help="random training crops to fit on")
    ap.add_argument("--seconds", type=float, default=2.0, help="crop length")
    ap.add_argument("--iters", type=int, default=25, help="k-means iterations per codebook")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_all(args.seed)
    from transformers import EncodecConfig, EncodecModel

    src = load(args.model, args.filters)
    cfg = src.config
    n_old = cfg.num_quantizers
    per_q = cfg.frame_rate * math.log2(cfg.codebook_size) / 1000  # kbps per codebook
    bws = list(cfg.target_bandwidths)
    for n in range(n_old + args.group, n_old + args.add + 1, args.group):
        bws.append(round(n * per_q, 3))
    new_cfg = EncodecConfig(**{**cfg.to_dict(), "target_bandwidths": bws})
    assert new_cfg.num_quantizers == n_old + args.add, (bws, new_cfg.num_quantizers)

    # the encoder's latents on training crops, less what the existing stages code
    data = Crops(args.data, args.seconds, args.seed)
    frames = []
    with torch.no_grad():
        for i in range(0, args.crops, 16):
            e = src.encoder(data.batch(min(16, args.crops - i)))  # [B, D, T]
            frames.append(e.permute(0, 2, 1).reshape(-1, e.shape[1]))
    r = torch.cat(frames)
    energy = [float((r ** 2).sum(1).mean())]
    gen = torch.Generator().manual_seed(args.seed)
    books = []
    for j in range(n_old + args.add):
        if j < n_old:
            book = src.quantizer.layers[j].codebook.embed
        else:
            book = kmeans(r, cfg.codebook_size, args.iters, gen)
            books.append(book)
        r = residual(r, book)
        energy.append(float((r ** 2).sum(1).mean()))

    # the new layers' EMA training buffers stay as initialised: export() drops them
    model = EncodecModel(new_cfg).eval()
    state = {**model.state_dict(), **src.state_dict()}
    for j, book in enumerate(books):
        state[f"quantizer.layers.{n_old + j}.codebook.embed"] = book
    model.load_state_dict(state)
    export(model, args.out)
    report = dict(frames=len(r), codebooks=new_cfg.num_quantizers, target_bandwidths=bws,
                  residual_energy_by_stage=[round(x, 5) for x in energy])
    (args.out / "rvq_extend.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
