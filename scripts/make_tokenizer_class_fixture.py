"""Make tests/data/tokenizer-classes/gemma (run outside CI, in the peer venv of shared/peer/setup.sh; seconds).

A small SentencePiece-style BPE (byte fallback, "▁" for spaces) trained here on a few sentences, saved with a
tokenizer.json whose own pipeline is *not* Gemma's (a Metaspace pre-tokenizer that prepends "▁", no normalizer)
and a tokenizer_config.json naming `GemmaTokenizer`. transformers 5 builds the class's own normalizer,
pre-tokenizer and decoder; expected.json holds its ids (with and without special tokens) and decoded text
(special tokens skipped, as kto decodes) for
texts with leading, repeated and trailing spaces, newlines, special tokens and characters outside the vocabulary.
"""
import json
import os
import tempfile

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "data", "tokenizer-classes", "gemma")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = ["The sky is blue.", "Bees make honey.", "A cat has four legs.", "Fish live in water.",
          "What color is the sky?", "Once upon a time there was a story.", "  two spaces and\nnew lines\n"] * 20
TEXTS = ["The sky is blue.", " leading space", "two  spaces", "trailing ", "line one\nline two\n\n",
         "<start_of_turn>user\nWhat color is the sky?<end_of_turn>\n<start_of_turn>model\n", "naïve café ☃", ""]

tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
tok.normalizer = normalizers.Replace(" ", "▁")
bytes_ = [f"<0x{b:02X}>" for b in range(256)]
trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL + bytes_, initial_alphabet=["▁"])
tok.train_from_iterator(CORPUS, trainer)
# The file's own pipeline differs from the class's, so the test sees which one wins.
tok.normalizer = None
tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])

os.makedirs(OUT, exist_ok=True)
tok.save(os.path.join(OUT, "tokenizer.json"))
config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
          "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False,
          "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)

hf = AutoTokenizer.from_pretrained(OUT)
assert type(hf).__name__ == "GemmaTokenizer", type(hf)
cases = []
for text in TEXTS:
    ids = hf(text, add_special_tokens=True)["input_ids"]
    cases.append({"text": text, "ids": ids, "ids_plain": hf(text, add_special_tokens=False)["input_ids"],
                  "decoded": hf.decode(ids, skip_special_tokens=True)})
file_ids = [tok.encode(c["text"]).ids for c in cases]
assert any(f != c["ids"] for f, c in zip(file_ids, cases)), "the file's own pipeline gives the class's ids: no test"
with open(os.path.join(OUT, "expected.json"), "w") as f:
    f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")
print("wrote", OUT, [len(c["ids"]) for c in cases])
