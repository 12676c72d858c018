"""Log-probabilities of generated tokens, on `/v1/predict`, completions and chat, whole and streamed: one per token,
alternatives best first, streamed entries adding up to the whole answer's, refusals naming their field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import CHATTY as TASK
from .conftest import SINGLE, TOKENIZERS, Server

INPUTS = [f"input number {i}: hello world" for i in range(8)]


def post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def events(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


@TOKENIZERS
def test_greedy_logprobs_cover_every_token_and_change_nothing(chatty: Server) -> None:
    """One entry per generated token (EOS, when reached, is the last: Output ids and log-probabilities are one
    list each); the chosen token is the likeliest (greedy). That they equal a teacher-forced pass, i.e. what
    /v1/score computes, is checked in-process (test_scheduler.py): this random tiny model never reaches EOS."""
    body = {"model": TASK, "prompt": INPUTS, "max_tokens": 32, "temperature": 0, "logprobs": 3}
    got = post(chatty.url, "/v1/completions", body)
    plain = post(chatty.url, "/v1/completions", {**body, "logprobs": None})
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in plain["choices"]]  # asking changes nothing
    assert all(c["logprobs"] is None for c in plain["choices"])
    assert sum(len(c["logprobs"]["tokens"]) for c in got["choices"]) == got["usage"]["completion_tokens"]
    for choice in got["choices"]:
        lp = choice["logprobs"]
        for chosen, token, top in zip(lp["token_logprobs"], lp["tokens"], lp["top_logprobs"], strict=True):
            assert len(top) <= 4 and top[token] == chosen
            assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the chosen one is the likeliest


@TOKENIZERS
def test_predict_logprobs_whole_and_streamed_agree(chatty: Server) -> None:
    body = {"task": TASK, "inputs": INPUTS[:3], "max_new_tokens": 24, "logprobs": 2}
    whole = post(chatty.url, "/v1/predict", body)
    assert "logprobs" not in post(chatty.url, "/v1/predict", {**body, "logprobs": None})  # left out unless asked
    for entries in whole["logprobs"]:
        assert entries and all(len(e["top_logprobs"]) == 2 for e in entries)
        for e in entries:
            alternatives = [a["logprob"] for a in e["top_logprobs"]]
            assert alternatives == sorted(alternatives, reverse=True) and e["logprob"] <= 0
    streamed: list[list[dict]] = [[] for _ in INPUTS[:3]]
    for e in events(chatty.url, "/v1/predict", body):
        if "index" in e:
            streamed[e["index"]] += e.get("logprobs", [])
    for got, want in zip(streamed, whole["logprobs"], strict=True):
        assert [e["token"] for e in got] == [e["token"] for e in want]
        assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in want], abs=1e-5)


@TOKENIZERS
def test_completion_and_chat_shapes_streamed_too(chatty: Server, client: openai.OpenAI) -> None:
    ask = {"model": TASK, "messages": [{"role": "user", "content": INPUTS[0]}], "temperature": 0, "max_tokens": 12}
    chat = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)
    streamed = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2, stream=True)
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]

    body = {"model": TASK, "prompt": INPUTS[:2], "max_tokens": 12, "temperature": 0, "logprobs": 1}
    whole = post(chatty.url, "/v1/completions", body)
    chunks = events(chatty.url, "/v1/completions", body)
    for i, choice in enumerate(whole["choices"]):
        parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert [t for p in parts if p for t in p["tokens"]] == choice["logprobs"]["tokens"]
        assert len(choice["logprobs"]["text_offset"]) == len(choice["logprobs"]["tokens"])
    sampled = post(chatty.url, "/v1/completions", {**body, "temperature": 1.0, "seed": 5})
    assert all(lp <= 0 for c in sampled["choices"] for lp in c["logprobs"]["token_logprobs"])


@SINGLE
@pytest.mark.parametrize(
    ("path", "extra", "status", "param"),
    [
        ("/v1/completions", {"echo": True}, 400, "echo"),
        ("/v1/completions", {"logprobs": 21}, 422, "logprobs"),
        ("/v1/completions", {"logprobs": True}, 422, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    ],
)
def test_logprobs_refusals_name_their_field(chatty: Server, path: str, extra: dict, status: int, param: str) -> None:
    base = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{chatty.url}{path}", json={"model": TASK, "max_tokens": 2, **base, **extra}, timeout=60)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    if param == "echo":
        assert "encoder-decoder" in r.json()["error"]["message"]
    beams = httpx.post(
        f"{chatty.url}/v1/predict", json={"task": TASK, "inputs": ["x"], "num_beams": 2, "logprobs": 1}, timeout=60
    )
    assert beams.status_code == 422 and "beam search" in beams.text  # kronserve's routes: 422 invalid_request
