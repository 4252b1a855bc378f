#!/usr/bin/env python3
"""Evaluation against real TRL 1.16 (tests/data/eval, checked by tests/trl_eval.rs).

The Qwen2-style policy and its separate reference of tests/data/arch/qwen2, 16 conversational training rows and
10 eval rows (eval batches of 4, 4 and 2), SGD, batch 2 with gradient accumulation 2, 4 steps, evaluation every 2
steps and before training (`eval_on_start`). Two runs: the reference online (TRL's default) and precomputed
(`precompute_ref_log_probs`). Writes train.jsonl, eval.jsonl and expected.json (each run's settings and
log_history). usage: make_eval_fixture.py OUT_DIR (peer venv: ../shared/peer/setup.sh)
"""
import json, os, sys, tempfile
os.environ.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer

out = sys.argv[1]
arch = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "arch", "qwen2")
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
subjects = ["the sky", "grass", "snow", "coal", "the sea", "a lemon", "milk", "a cherry", "ash", "gold", "rust", "ink",
            "a leaf", "the sun", "a crow", "chalk", "a plum", "sand", "moss", "blood", "pearl", "slate", "a lime",
            "cream", "ivory", "jade"]
colours = ["blue", "green", "white", "black", "blue", "yellow", "white", "red", "grey", "golden", "brown", "black",
           "green", "yellow", "black", "white", "purple", "beige", "green", "red", "white", "grey", "green", "white",
           "white", "green"]
rows = []
for i, (s, c) in enumerate(zip(subjects, colours)):
    good = i % 3 != 1
    answer = c if good else colours[(i + 5) % len(colours)]
    words = " ".join(["very"] * (i % 4))  # completions of different lengths
    rows.append({"prompt": [U(f"What colour is {s}?")], "completion": [A(f"{s.capitalize()} is {words} {answer}.".replace("  ", " "))], "label": good})
train, evals = rows[:16], rows[16:]
for name, part in [("train.jsonl", train), ("eval.jsonl", evals)]:
    with open(os.path.join(out, name), "w") as f:
        for r in part:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
hp = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.33, per_device_train_batch_size=2,
          gradient_accumulation_steps=2, per_device_eval_batch_size=4, max_length=128, optim="sgd", learning_rate=0.05,
          lr_scheduler_type="constant", max_steps=4, logging_steps=1, eval_strategy="steps", eval_steps=2,
          eval_on_start=True, seed=0)
runs = {}
for mode, extra in [("online", {}), ("precomputed", {"precompute_ref_log_probs": True})]:
    tok = AutoTokenizer.from_pretrained(os.path.join(arch, "policy"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(arch, "policy"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(arch, "reference"), dtype=torch.float32)
    args = KTOConfig(output_dir=tempfile.mkdtemp(), save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                     gradient_checkpointing=False, disable_tqdm=True, **hp, **extra)
    tr = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(train),
                    eval_dataset=Dataset.from_list(evals), processing_class=tok)
    tr.train()
    runs[mode] = {"hyperparameters": {**hp, **extra}, "log_history": tr.state.log_history}
    print(mode, [{k: v for k, v in h.items() if k in ("step", "eval_loss", "eval_num_tokens", "loss")} for h in tr.state.log_history])
json.dump(runs, open(os.path.join(out, "expected.json"), "w"), indent=1)
