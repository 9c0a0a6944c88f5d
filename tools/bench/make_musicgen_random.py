"""A random-weight MusicGen for `cadenza bench load`: the shipped musicgen-tiny's T5,
tokenizer and codec with a larger random decoder (512 wide, 8 layers, 8 heads: 34 M parameters).

    /work/venv/ref/bin/python tools/bench/make_musicgen_random.py [OUT]   (default /tmp/mgsmall/model)

then serve it with a config like

    [[models]]
    name = "musicgen-34m-random"
    kind = "music"
    source = "/tmp/mgsmall/model"

and run `cadenza bench load --local --config that.toml --streams 1,1,4,8,16 --rounds 3`.
"""
import json, shutil, sys, torch
from transformers import MusicgenForConditionalGeneration, MusicgenConfig
src = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "models/pretrained/musicgen-tiny")
out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/mgsmall/model"
tiny = MusicgenForConditionalGeneration.from_pretrained(src)
cfg = tiny.config.to_dict()
d = cfg["decoder"]
d.update(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, ffn_dim=2048)
cfg["decoder"] = d
torch.manual_seed(0)
conf = MusicgenConfig.from_dict(cfg)
m = MusicgenForConditionalGeneration(conf)
m.text_encoder.load_state_dict(tiny.text_encoder.state_dict())
m.audio_encoder.load_state_dict(tiny.audio_encoder.state_dict())
m.generation_config = tiny.generation_config
m.save_pretrained(out, safe_serialization=True)
shutil.copy(f"{src}/tokenizer.json", out)
print("decoder params", sum(p.numel() for p in m.decoder.parameters()))
