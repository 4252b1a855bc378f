#!/usr/bin/env python3
"""Expected renderings of real chat templates (tests/data/chat-templates, checked by tests/chat_templates.rs).

Copies the original (not `_training`) templates TRL 1.16 ships under `trl/chat_templates/` and renders a fixed set
of conversations with transformers' own renderer (`render_jinja_template`, as `apply_chat_template(...,
tokenize=False)` runs it), the date pinned to 2026-12-03 for `strftime_now`. A rendering that raises (the template's
`raise_exception`) is recorded as the error's message. Writes TEMPLATE.jinja files and cases.json.
usage: make_chat_template_fixtures.py OUT_DIR (peer venv: ../shared/peer/setup.sh)
"""
import datetime as dt, json, os, shutil, sys
import trl
import transformers.utils.chat_template_utils as ctu

TEMPLATES = ["llama3", "llama3_1", "llama3_2", "qwen2_5", "qwen3", "qwen3_instruct_2507", "gemma", "gemma3", "phi3",
             "phi3_5", "deepseekv3", "deepseek_r1_distill", "cohere", "cohere2", "glm4moe", "gptoss", "lfm2", "smolvlm",
             "nemotron_3_nano"]
SPECIAL = {"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>", "unk_token": "<UNK>"}


class PinnedDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 12, 3, 14, 5, 9)


ctu.datetime = PinnedDatetime
S = lambda c: {"role": "system", "content": c}
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                          "required": ["city"]}}}
CONVERSATIONS = [
    {"messages": [U("Hello!")], "add_generation_prompt": True},
    {"messages": [S("You are a concise assistant."), U("What is 12 × 7?"), A("84.")], "add_generation_prompt": False},
    {"messages": [U("Translate 'thank you' to German."), A("Danke."), U("And to French? 🙂")], "add_generation_prompt": True},
    {"messages": [S("Answer in one word."), U("Écris «bonjour»\nen majuscules."), A("BONJOUR"), U("Merci")], "add_generation_prompt": False},
    {"messages": [U("Weather in Paris?")], "add_generation_prompt": True, "tools": [WEATHER]},
    {"messages": [A("I start."), U("Fine.")], "add_generation_prompt": True},
]
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
src = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
cases = []
for name in TEMPLATES:
    template = open(os.path.join(src, name + ".jinja"), encoding="utf-8").read()
    shutil.copy(os.path.join(src, name + ".jinja"), os.path.join(out, name + ".jinja"))
    for i, conv in enumerate(CONVERSATIONS):
        case = {"template": name, "conversation": i}
        try:
            case["rendered"] = ctu.render_jinja_template(conversations=[conv["messages"]], tools=conv.get("tools"),
                                                         chat_template=template, add_generation_prompt=conv["add_generation_prompt"],
                                                         **SPECIAL)[0][0]
        except Exception as e:  # the template refused the conversation
            case["error"] = str(e)
        cases.append(case)
json.dump({"trl": trl.__version__, "special_tokens": SPECIAL, "date": "2026-12-03T14:05:09", "conversations": CONVERSATIONS,
           "cases": cases}, open(os.path.join(out, "cases.json"), "w", encoding="utf-8"), ensure_ascii=False, indent=1)
print(len(TEMPLATES), "templates,", len(cases), "cases,", sum("error" in c for c in cases), "refused")
