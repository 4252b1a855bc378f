"""Check that an adapter written by `kto train` (use_peft = true) loads in PEFT, and that `kto merge` equals
PEFT's own merge (outside CI; needs the peer venv plus `pip install peft`).

usage: python scripts/check_peft_adapter.py BASE_DIR ADAPTER_DIR [MERGED_DIR]
"""
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, adapter_dir = sys.argv[1], sys.argv[2]
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter_dir)
ids = torch.tensor([[1, 447, 335, 81, 267, 333, 274, 286, 80, 94]])
with torch.no_grad():
    adapted = model(input_ids=ids).logits
    with model.disable_adapter():
        plain = model(input_ids=ids).logits
print(f"ok: PEFT loaded {adapter_dir}; the adapter moves the logits by up to {float((adapted - plain).abs().max()):.3g}")
if len(sys.argv) > 3:
    merged = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float32)
    with torch.no_grad():
        diff = float((merged(input_ids=ids).logits - adapted).abs().max())
    assert diff < 1e-4, diff
    print(f"ok: kto merge output equals PEFT's adapted model (max |Δ logit| {diff:.2g})")
