"""A 20-turn conversation through `attractors serve` with the official `openai` client, in
streaming and non-streaming mode. Usage: serve_openai.py BASE_URL BUDGET TURNS.
Prints one JSON line of what it saw; exits non-zero on the first broken promise."""
import json
import sys
import urllib.request

from openai import OpenAI

url, budget, turns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
model = client.models.list().data[0].id
questions = [
    "Tell me about whales.", "What do they eat?", "How big is the blue whale?", "Where do they live?",
    "Do they sing?", "Why do they sing?", "How long do they live?", "Are they endangered?",
    "What is a humpback?", "What is krill?", "Can whales sleep?", "How deep can they dive?",
    "Who hunted them?", "What is ambergris?", "Tell me about Moby-Dick.", "Who was Ahab?",
    "What is a harpoon?", "What is a pod?", "How do calves feed?", "Say goodbye in one sentence.",
]


def check_kv(kv, conv, where):
    assert kv is not None, f"{where}: no kv in the answer"
    assert kv["cells"] <= budget and kv["max_cells"] <= budget, f"{where}: cache over {budget}: {kv}"
    if conv is not None:
        assert kv["conversation"] == conv, f"{where}: a new conversation started: {kv} (was {conv})"
    return kv["conversation"]


seen = {}
for mode in ("whole", "stream"):
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in two sentences."}]
    conv, replies, kv = None, 0, None
    for t in range(turns):
        messages.append({"role": "user", "content": questions[t % len(questions)]})
        if mode == "whole":
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0.7, seed=t)
            text = r.choices[0].message.content
            assert r.choices[0].finish_reason in ("stop", "length"), r
            assert r.usage.completion_tokens >= 1, r.usage
            kv = r.model_extra.get("kv")
        else:
            text, kv, usage = "", None, None
            for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0.7, seed=t, stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                if (chunk.model_extra or {}).get("kv"):
                    kv = chunk.model_extra["kv"]
                if chunk.usage:
                    usage = chunk.usage
            assert usage is not None and usage.completion_tokens >= 1, "no usage chunk"
        assert isinstance(text, str) and text.strip(), f"{mode} turn {t}: empty reply"
        conv = check_kv(kv, conv, f"{mode} turn {t}")
        replies += 1
        messages.append({"role": "assistant", "content": text})
    assert kv["evicted_tokens"] > 0, f"{mode}: {turns} turns never overflowed {budget} cells: {kv}"
    seen[mode] = {"replies": replies, "conversation": conv, "evicted_tokens": kv["evicted_tokens"], "max_cells": kv["max_cells"]}

metrics = urllib.request.urlopen(url + "/metrics").read().decode()
m = {l.split()[0]: float(l.split()[1]) for l in metrics.splitlines() if l and not l.startswith("#")}
assert m["attractors_kv_cells_max"] <= budget, m
assert m["attractors_evicted_tokens_total"] > 0, m
seen["metrics"] = {k: m[k] for k in ("attractors_kv_cells_max", "attractors_evicted_tokens_total", "attractors_generated_tokens_total", "attractors_requests_total")}
print(json.dumps(seen))
