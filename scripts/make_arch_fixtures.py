"""Make the architecture fixtures in tests/data/arch (run outside CI, in the peer venv of shared/peer/setup.sh).

usage: python scripts/make_arch_fixtures.py [OUT_DIR [FAMILY...]]   (default tests/data/arch, every family; ~1 min)

For each family (qwen2, qwen3, mistral, llama3, gemma2, gemma3) it writes OUT_DIR/<family>/:
  policy/, reference/   small random models saved by transformers (save_pretrained, safetensors), with the fixture
                        tokenizer and a chat template in the family's own style
  expected.json         fixed inputs, transformers' logits and sequence log-probs on them, and the log_history of
                        a 2-step real TRL KTOTrainer run (SGD) on conversational data rendered with that template
  grads.safetensors     PyTorch's gradient of  0.7·logp(seq 0) − 0.4·logp(seq 1)  for every parameter
Everything is seeded; the weights are scaled up from transformers' init so that the tests see real differences.
"""
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)
import trl
from trl import KTOConfig, KTOTrainer

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "tests", "data", "arch")
TOKENIZER = os.path.join(REPO, "tests", "data", "trl-tiny", "tokenizer")

COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
          " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# TRL's own Gemma templates (Gemma 3's folds a system message into the first user turn; Gemma's refuses one).
def trl_template(name):
    return open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", name), encoding="utf-8").read()


GEMMA = trl_template("gemma.jinja")
GEMMA3 = trl_template("gemma3.jinja")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")

FAMILIES = {
    # biases on q/k/v, tied embeddings, large rope_theta
    "qwen2": (lambda: Qwen2Config(**COMMON, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), CHATML),
    # q_norm/k_norm, explicit head_dim different from hidden/heads, no bias
    "qwen3": (lambda: Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), CHATML),
    # sliding-window attention, small enough to matter on short sequences
    "mistral": (lambda: MistralConfig(**COMMON, sliding_window=5, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), MISTRAL),
    # Llama 3 rope scaling
    "llama3": (lambda: LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), LLAMA3),
    # (1 + w) norms, four norms per layer, embeddings scaled by sqrt(hidden), GELU-tanh MLP, query_pre_attn_scalar
    # unlike head_dim, a sliding layer then a full one (the default layer_types), and soft-caps of the attention
    # scores and of the logits small enough that tanh bends this model's values (the real ones are 50 and 30)
    "gemma2": (lambda: Gemma2Config(**COMMON, head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
                                    attn_logit_softcapping=0.5, final_logit_softcapping=2.0,
                                    tie_word_embeddings=True), GEMMA),
    # (1 + w) norms (q/k norms too), four norms per layer, embeddings scaled by sqrt(hidden), GELU-tanh MLP,
    # query_pre_attn_scalar unlike head_dim, a sliding layer with its local RoPE base beside a global one with
    # linear scaling
    "gemma3": (lambda: Gemma3TextConfig(**COMMON, head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
                                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                                        rope_parameters={
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                                               "factor": 2.0}}), GEMMA3),
}

SEQS = [[1, 45, 389, 304, 308, 94, 317, 74, 76, 88, 19, 2, 7, 301, 29, 13, 140, 222, 90, 3],
        [1, 447, 356, 381, 291, 386, 80, 74, 36, 2, 204]]
PROMPT_LENS = [7, 4]
COEF = [0.7, -0.4]

CONV = [
    ("What color is the sky?", "The sky is blue.", True), ("What do bees make?", "Bees make cheese.", False),
    ("How many legs does a cat have?", "A cat has four legs.", True), ("Where do fish live?", "Fish live in trees.", False),
    ("What is ice made of?", "Ice is frozen water.", True), ("What sound does a cat make?", "A cat says moo.", False),
    ("Name a yellow fruit.", "A banana is yellow.", True), ("What do cows drink?", "Cows drink water.", True),
]


def scramble(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # Gemma's norms scale by (1 + w): centre its weights on 0 so the scale is near 1 as elsewhere.
                centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
                p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def seq_logps(model):
    width = max(len(s) for s in SEQS)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in SEQS])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in SEQS])
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    out = []
    for i, s in enumerate(SEQS):
        out.append(logp[i, PROMPT_LENS[i] - 1 : len(s) - 1].sum())
    return logits, torch.stack(out)


def save_family_folder(model, path, template):
    model.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.chat_template = template
    tok.save_pretrained(path)


def main():
    only = sys.argv[2:] or list(FAMILIES)
    for family, (make_config, template) in FAMILIES.items():
        if family not in only:
            continue
        d = os.path.join(OUT, family)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        models = {}
        for role, seed in [("policy", 0), ("reference", 1)]:
            torch.manual_seed(seed)
            m = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
            scramble(m, seed + 100)
            save_family_folder(m, os.path.join(d, role), template)
            models[role] = AutoModelForCausalLM.from_pretrained(os.path.join(d, role), dtype=torch.float32)
        policy = models["policy"]
        policy.train()
        logits, logps = seq_logps(policy)
        loss = sum(c * l for c, l in zip(COEF, logps))
        loss.backward()
        save_file({n: p.grad.detach().contiguous() for n, p in policy.named_parameters()}, os.path.join(d, "grads.safetensors"))

        # A real TRL run on conversational data rendered with the family's template.
        tok = AutoTokenizer.from_pretrained(os.path.join(d, "policy"))
        rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}], "label": l}
                for p, c, l in CONV]
        with open(os.path.join(d, "conversational.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        args = KTOConfig(output_dir=os.path.join("/tmp", "kto-arch", family), per_device_train_batch_size=4,
                         max_length=128, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", max_steps=2,
                         logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                         gradient_checkpointing=False, disable_tqdm=True, seed=0, beta=0.1, undesirable_weight=1.33)
        trl_policy = AutoModelForCausalLM.from_pretrained(os.path.join(d, "policy"), dtype=torch.float32)
        trl_ref = AutoModelForCausalLM.from_pretrained(os.path.join(d, "reference"), dtype=torch.float32)
        trainer = KTOTrainer(model=trl_policy, ref_model=trl_ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        trainer.train()
        expected = {
            "family": family,
            "sequences": SEQS,
            "prompt_lengths": PROMPT_LENS,
            "coefficients": COEF,
            "logits": [logits[i, : len(s)].tolist() for i, s in enumerate(SEQS)],
            "sequence_logps": logps.tolist(),
            "trl_log_history": trainer.state.log_history,
            "trl_prepared_rows": [{k: r[k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids")} for r in trainer.train_dataset],
        }
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(expected, f)
        print(family, "logps", [round(float(x), 4) for x in logps], "trl losses",
              [h.get("loss") for h in trainer.state.log_history])


if __name__ == "__main__":
    main()
