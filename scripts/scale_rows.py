#!/usr/bin/env python3
"""Chat rows long enough to fill a given max_length (prompt ~40% of it, the completion running past the end and
truncated there, as TRL and kto both truncate), for timing TRL and kto at sequence lengths beyond the peer's
`scale/` data. Words from `../shared/peer/scale/make_qwen05.py`'s list. usage: scale_rows.py OUT.jsonl SEQ [ROWS]"""
import json, random, sys

out, seq = sys.argv[1], int(sys.argv[2])
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 8
random.seed(seq)
words = "the a cat dog sat ran over under quickly slowly red blue green house tree river mountain small large happy sad".split()
with open(out, "w") as f:
    for i in range(rows):
        p = " ".join(random.choice(words) for _ in range(int(seq * 0.4)))
        c = " ".join(random.choice(words) for _ in range(int(seq * 0.8)))
        row = {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}], "label": i % 3 != 0}
        f.write(json.dumps(row) + "\n")
