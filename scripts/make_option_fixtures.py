#!/usr/bin/env python3
"""Trainer options against real TRL 1.16 (tests/data/options/expected.json, checked by tests/trl_options.rs).

On the trl-tiny fixture (tests/data/trl-tiny: policy, separate reference, kto.jsonl), SGD, 5 steps of batch 4 with
one warm-up step, one run per option set: each learning-rate scheduler with its `lr_scheduler_kwargs`,
`logging_first_step`, `max_grad_norm = 0` (no clipping), and with kto.jsonl as the eval set too: the final
step's evaluation and `logging_strategy` / `eval_strategy` = "epoch".  Writes each run's settings and log_history.
usage: make_option_fixtures.py OUT_DIR (peer venv: ../shared/peer/setup.sh)
"""
import json, os, sys, tempfile
os.environ.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer

torch.set_num_threads(1)
tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "trl-tiny")
base = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.33, per_device_train_batch_size=4, max_length=64,
            optim="sgd", learning_rate=1e-2, max_steps=5, warmup_steps=1, logging_steps=1, seed=0, save_strategy="no")
RUNS = {
    "cosine_num_cycles": dict(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": 1.25}),
    "cosine_with_restarts": dict(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}),
    "polynomial": dict(lr_scheduler_type="polynomial", lr_scheduler_kwargs={"lr_end": 1e-4, "power": 2.0}),
    "inverse_sqrt": dict(lr_scheduler_type="inverse_sqrt", lr_scheduler_kwargs={"timescale": 2}),
    "cosine_with_min_lr": dict(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 2e-3}),
    "cosine_warmup_with_min_lr": dict(lr_scheduler_type="cosine_warmup_with_min_lr", warmup_steps=2,
                                      lr_scheduler_kwargs={"min_lr_rate": 0.1}),
    "warmup_stable_decay": dict(lr_scheduler_type="warmup_stable_decay",
                                lr_scheduler_kwargs={"num_decay_steps": 2, "min_lr_ratio": 0.1, "decay_type": "linear"}),
    "logging_first_step": dict(lr_scheduler_type="linear", logging_steps=2, logging_first_step=True),
    "no_clipping": dict(lr_scheduler_type="constant", max_grad_norm=0.0, learning_rate=0.5),
    # With an eval set (kto.jsonl itself, "eval": true below): the last step is evaluated though 5 % 2 != 0;
    # per-epoch logging and evaluation over 2 epochs (6 steps each), and cut short in the second (max_steps = 8).
    "final_step_eval": dict(lr_scheduler_type="linear", eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8),
    "epoch_strategies": dict(lr_scheduler_type="linear", max_steps=-1, num_train_epochs=2, logging_strategy="epoch",
                             eval_strategy="epoch", per_device_eval_batch_size=8),
    "epoch_strategies_cut": dict(lr_scheduler_type="linear", max_steps=8, logging_strategy="epoch", eval_strategy="epoch",
                                 per_device_eval_batch_size=8),
    # The best of 5 evaluations (a large constant rate, so the eval loss turns), its checkpoint kept from rotation.
    "load_best_model_at_end": dict(lr_scheduler_type="constant", learning_rate=2.0, eval_strategy="steps", eval_steps=1,
                                   save_strategy="steps", save_steps=1, save_total_limit=2, load_best_model_at_end=True,
                                   per_device_eval_batch_size=8),
}
WITH_EVAL = {"final_step_eval", "epoch_strategies", "epoch_strategies_cut", "load_best_model_at_end"}
out = {}
for name, extra in RUNS.items():
    hp = {**base, **extra}
    tok = AutoTokenizer.from_pretrained(os.path.join(tiny, "tokenizer"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(tiny, "policy"), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(tiny, "reference"), dtype=torch.float32)
    args = KTOConfig(output_dir=tempfile.mkdtemp(), report_to="none", bf16=False, use_cpu=True,
                     gradient_checkpointing=False, disable_tqdm=True, **hp)
    ds = load_dataset("json", data_files=os.path.join(tiny, "kto.jsonl"), split="train")
    evals = ds if name in WITH_EVAL else None
    tr = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, eval_dataset=evals, processing_class=tok)
    tr.train()
    out[name] = {"hyperparameters": hp, "eval": evals is not None, "log_history": tr.state.log_history}
    if tr.state.best_global_step is not None:
        out[name]["best"] = {"step": tr.state.best_global_step, "metric": tr.state.best_metric,
                             "checkpoints": sorted(d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-"))}
    print(name, [(h.get("step"), h.get("learning_rate"), h.get("grad_norm")) for h in tr.state.log_history])
json.dump(out, open(os.path.join(sys.argv[1], "expected.json"), "w"), indent=1)
