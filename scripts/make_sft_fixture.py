"""Run TRL's SFTTrainer on the trl-tiny fixture for tests/trl_sft.rs (outside CI; the peer venv has TRL 1.16).

usage: python scripts/make_sft_fixture.py
writes tests/data/sft/expected_sft_adamw.json: the log_history of 4 AdamW steps of SFT on the prompt/completion
columns of tests/data/trl-tiny/kto.jsonl (labels dropped), batch 4, gradient_accumulation_steps 2, max_length 64,
learning_rate 1e-3, constant schedule, sequential order (train_sampling_strategy), completion-only loss (TRL's
default for prompt/completion data), plus the trained policy's parameter checksum per tensor.
"""
import json
import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "data", "trl-tiny")
OUT = os.path.join(REPO, "tests", "data", "sft")

rows = [json.loads(l) for l in open(os.path.join(TINY, "kto.jsonl")) if l.strip()]
ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
tok = AutoTokenizer.from_pretrained(os.path.join(TINY, "policy"))
model = AutoModelForCausalLM.from_pretrained(os.path.join(TINY, "policy"), dtype=torch.float32)
args = SFTConfig(
    output_dir="/tmp/kto-sft-fixture",
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_length=64,
    learning_rate=1e-3,
    optim="adamw_torch",
    lr_scheduler_type="constant",
    max_steps=4,
    logging_steps=1,
    seed=0,
    bf16=False,
    fp16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    train_sampling_strategy="sequential",
    dataloader_num_workers=0,
    dataset_num_proc=1,
)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
first = trainer.train_dataset[0]
trainer.train()
sums = {n: float(p.detach().double().sum()) for n, p in trainer.model.named_parameters()}
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "expected_sft_adamw.json"), "w") as f:
    json.dump({"log_history": trainer.state.log_history, "first_row": {k: first[k] for k in first.keys()},
               "param_sums": sums}, f, indent=1)
print(json.dumps(trainer.state.log_history[:2], indent=1))
