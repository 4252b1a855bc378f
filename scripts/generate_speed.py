#!/usr/bin/env python3
"""transformers' sampling speed beside `kto generate` (issue: loading and sampling at the machine's limit).

Loads MODEL_DIR in fp32 as `from_pretrained` does, renders one chat prompt with the model's chat template, and
samples NEW tokens at temperature 1 (no top-k/top-p), timing the load and the generation separately; prints one
JSON line. Run `kto generate MODEL_DIR --prompt ... --max-new-tokens NEW` under `time` in the same sitting.

usage: generate_speed.py MODEL_DIR [NEW=64] [THREADS=2]
"""
import json, os, sys, time
os.environ.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = sys.argv[1]
new = int(sys.argv[2]) if len(sys.argv) > 2 else 64
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
t1 = time.perf_counter()
ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about rivers."}], add_generation_prompt=True, return_tensors="pt")
if not torch.is_tensor(ids):
    ids = ids["input_ids"]
torch.manual_seed(0)
with torch.no_grad():
    t2 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    t3 = time.perf_counter()
made = out.shape[1] - ids.shape[1]
print(json.dumps({"load_s": t1 - t0, "generate_s": t3 - t2, "new_tokens": made, "tokens_per_s": made / (t3 - t2), "prompt_tokens": ids.shape[1]}))
