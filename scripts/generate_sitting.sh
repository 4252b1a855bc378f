#!/bin/bash
# One sitting of #20: transformers (scripts/generate_speed.py) beside kto, interleaved, on the Qwen2.5-0.5B-shaped
# model (../shared/peer/scale/make_qwen05.py DIR/qwen05; the fp32 copy: from_pretrained(dtype=float32).save_pretrained
# DIR/qwen05-fp32 plus the tokenizer files, whose values are still bf16 values; DIR/qwen05-fp32-true: the same with
# every weight times (1 + 2^-12·N(0,1)), values only f32 holds, as a checkpoint trained in f32;
# DIR/prompts32.jsonl: {"prompt": "Tell me about rivers I."}, I = 0..31).
# usage: generate_sitting.sh KTO_BIN ROUNDS DIR
KTO=${1:-/work/main/target/release/kto}; ROUNDS=${2:-2}
PY=~/.cache/kto-peer/venv/bin/python; GS=$(cd "$(dirname "$0")" && pwd)/generate_speed.py
cd "${3:-/tmp/scale}"
date -u; lscpu | grep "Model name"; uptime
for r in $(seq $ROUNDS); do
  echo "== round $r"
  echo -n "T bf16 1: "; $PY $GS qwen05 64 2 1 2>/dev/null | tail -1
  echo -n "K bf16 1: "; $KTO bench --generate --model qwen05 --new-tokens 64 --prompt-len 34 2>&1 | tail -1
  echo -n "T fp32 1: "; $PY $GS qwen05-fp32 64 2 1 2>/dev/null | tail -1
  echo -n "K fp32 1: "; $KTO bench --generate --model qwen05-fp32 --new-tokens 64 --prompt-len 34 2>&1 | tail -1
  echo -n "T fp32-true 1: "; $PY $GS qwen05-fp32-true 64 2 1 2>/dev/null | tail -1
  echo -n "K fp32-true 1: "; $KTO bench --generate --model qwen05-fp32-true --new-tokens 64 --prompt-len 34 2>&1 | tail -1
  echo -n "T bf16 32: "; $PY $GS qwen05 64 2 32 2>/dev/null | tail -1
  echo -n "K bf16 32 bench: "; $KTO bench --generate --model qwen05 --new-tokens 64 --prompt-len 37 --batch 32 2>&1 | tail -1
  s=$(date +%s.%N); $KTO generate qwen05 --prompts prompts32.jsonl --max-new-tokens 64 --top-k 0 --out out32.jsonl 2>/dev/null; e=$(date +%s.%N)
  echo "K bf16 32 command: $(echo "$e - $s" | bc) s"
  uptime
done
date -u
