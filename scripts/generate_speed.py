#!/usr/bin/env python3
"""transformers' sampling speed beside `kto generate` (issue: loading and sampling at the machine's limit).

Loads MODEL_DIR in fp32 as `from_pretrained` does, renders one chat prompt with the model's chat template, and
samples NEW tokens at temperature 1 (no top-k/top-p), timing the load and the generation separately; prints one
JSON line. Run `kto generate MODEL_DIR --prompt ... --max-new-tokens NEW` under `time` in the same sitting.

With BATCH > 1, BATCH different prompts ("Tell me about rivers 0.", ...) are sampled together, left-padded, as one
`generate` call; compare with `kto generate --prompts` on the same prompts.

usage: generate_speed.py MODEL_DIR [NEW=64] [THREADS=2] [BATCH=1]
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
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
texts = ["Tell me about rivers."] if batch == 1 else [f"Tell me about rivers {i}." for i in range(batch)]
rendered = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False) for t in texts]
tok.padding_side = "left"
enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
ids = enc["input_ids"]
torch.manual_seed(0)
with torch.no_grad():
    t2 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    t3 = time.perf_counter()
made = (out.shape[1] - ids.shape[1]) * out.shape[0]
print(json.dumps({"load_s": t1 - t0, "generate_s": t3 - t2, "new_tokens": made, "tokens_per_s": made / (t3 - t2), "prompt_tokens": ids.shape[1], "batch": batch}))
