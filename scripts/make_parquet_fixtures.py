"""Write the Parquet test fixtures in tests/data/parquet with pyarrow (outside CI; the peer venv has pyarrow).

usage: python scripts/make_parquet_fixtures.py
  kto.parquet               the rows of tests/data/trl-tiny/kto.jsonl (snappy, pyarrow's default)
  shards/part-0000{0,1}.parquet   the same rows split in two files (a folder of shards)
  conversational.parquet    tests/data/trl-tiny/kto_conversational.jsonl: message lists as list<struct>
  mapped.parquet            other column names (question / answer / thumbs_up) and 0/1 integer labels, gzip
"""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "tests", "data", "trl-tiny")
OUT = os.path.join(REPO, "tests", "data", "parquet")


def rows(name):
    with open(os.path.join(SRC, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


os.makedirs(os.path.join(OUT, "shards"), exist_ok=True)
kto = rows("kto.jsonl")
pq.write_table(pa.Table.from_pylist(kto), os.path.join(OUT, "kto.parquet"))
pq.write_table(pa.Table.from_pylist(kto[:10]), os.path.join(OUT, "shards", "part-00000.parquet"))
pq.write_table(pa.Table.from_pylist(kto[10:]), os.path.join(OUT, "shards", "part-00001.parquet"))
pq.write_table(pa.Table.from_pylist(rows("kto_conversational.jsonl")), os.path.join(OUT, "conversational.parquet"))
mapped = [{"question": r["prompt"], "answer": r["completion"], "thumbs_up": int(r["label"])} for r in kto[:8]]
pq.write_table(pa.Table.from_pylist(mapped), os.path.join(OUT, "mapped.parquet"), compression="gzip")
print("wrote", sorted(os.listdir(OUT)))
