"""Check that a folder written by `kto train` loads in transformers (outside CI; needs the peer venv).

usage: python scripts/check_saved_model.py OUTPUT_DIR [ORIGINAL_MODEL_DIR]

Loads OUTPUT_DIR with AutoModelForCausalLM and AutoTokenizer, fails on missing or unexpected keys, checks every
parameter equals the safetensors file bit for bit, runs a forward pass, and (given the original folder) prints
how far training moved the weights.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

out = sys.argv[1]
model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
tok = AutoTokenizer.from_pretrained(out)
stored = load_file(f"{out}/model.safetensors")
state = model.state_dict()
for name, tensor in stored.items():
    assert torch.equal(state[name], tensor), name
ids = tok("What color is the sky?", return_tensors="pt")
with torch.no_grad():
    logits = model(**ids).logits
assert torch.isfinite(logits).all()
print(f"ok: {out} loads in transformers ({sum(p.numel() for p in model.parameters())} parameters, "
      f"{len(stored)} tensors equal to the file, logits {tuple(logits.shape)} finite)")
if len(sys.argv) > 2:
    orig = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
    delta = sum(((a - b) ** 2).sum() for a, b in zip(model.state_dict().values(), orig.state_dict().values())) ** 0.5
    print(f"weight change from {sys.argv[2]}: L2 {float(delta):.4g}")
