# ../shared/peer/scale/trl_run.py with max_length as a sixth argument (the peer fixes it at 512), for the README's
# sequence-length table beside `kto train` on the same rows (scripts/scale_rows.py).
import os, sys, time, json, resource
os.environ.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
import torch
torch.set_num_threads(2)
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import KTOConfig, KTOTrainer
# usage: trl_seq_run.py MODEL_DIR DATA.jsonl OUT_DIR STEPS GRAD_CKPT(0|1) MAX_LENGTH; prints one JSON line (times, peak RSS, log_history)
model_dir, data, out, steps, gc, max_length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6])
t0 = time.time()
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ds = load_dataset("json", data_files=data, split="train")
times = []
class T(TrainerCallback):
    def on_step_begin(self, a, s, c, **k): self.t = time.perf_counter()
    def on_step_end(self, a, s, c, **k): times.append(time.perf_counter() - self.t)
cfg = KTOConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=max_length,
    learning_rate=1e-6, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
    use_cpu=True, gradient_checkpointing=gc, disable_tqdm=True, seed=0, optim="adamw_torch")
tr = KTOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[T()])
t1 = time.time()
tr.train()
t2 = time.time()
print(json.dumps({"load_s": t1 - t0, "train_s": t2 - t1, "step_s": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "log": [h for h in tr.state.log_history if "loss" in h]}))
