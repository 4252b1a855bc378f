"""Greedy continuations from transformers' `generate` (KV cache on), for tests/generation.rs (outside CI).

usage: python scripts/make_generation_fixture.py
writes tests/data/generation/greedy.json: for the trl-tiny policy and each architecture fixture's policy, a few
prompts (token ids, as kto tokenizes text prompts: the tokenizer with its special tokens) and the 24 tokens
greedy decoding adds (stopping early at EOS, which is left out).
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
MODELS = {
    "trl-tiny": os.path.join(DATA, "trl-tiny", "policy"),
    **{f"arch/{n}": os.path.join(DATA, "arch", n, "policy") for n in ["qwen2", "qwen3", "mistral", "llama3", "gemma2", "gemma3"]},
}
PROMPTS = ["What color is the sky on a clear day?", "Name a fruit.", "Once upon a time there was a very long story that"]
NEW_TOKENS = 24

out = {}
for name, path in MODELS.items():
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )[0, len(ids):].tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id)]
        cases.append({"prompt": prompt, "prompt_ids": ids, "generated": gen})
    out[name] = {"model": os.path.relpath(path, DATA), "eos_token_id": tok.eos_token_id, "cases": cases}

os.makedirs(os.path.join(DATA, "generation"), exist_ok=True)
with open(os.path.join(DATA, "generation", "greedy.json"), "w") as f:
    json.dump(out, f, indent=1)
print("wrote", os.path.join(DATA, "generation", "greedy.json"))
