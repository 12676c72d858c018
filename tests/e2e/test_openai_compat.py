"""What OpenAI clients send by default, against a real server: explicit nulls mean the defaults, vLLM's extensions
(`ignore_eos`, `include_stop_str_in_output`, `continuous_usage_stats`, `skip_special_tokens`), any int64 seed,
token-id prompts, neutral values compared exactly, clean `param` names, HEAD on every GET route, and metric series
that exist at zero."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from ..reliability.conftest import metric_samples
from .conftest import CHATTY as TASK
from .conftest import SINGLE, TOKENIZERS, Server, prompt_tokens
from .test_openai import predict


def completions(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": TASK, **body}, timeout=60)


def chunks(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}{path}", json={"model": TASK, **body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@SINGLE
def test_explicit_nulls_are_the_defaults(chatty: Server, client: openai.OpenAI) -> None:
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "top_k", "min_tokens", "stop", "seed", "user"))
    nulls |= dict.fromkeys(("stream_options", "logprobs", "echo", "suffix", "best_of", "presence_penalty"))
    r = completions(chatty.url, {"prompt": "hello world", "max_tokens": None, "ignore_eos": True, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens, not kronserve's 32
    got = client.completions.create(
        model=TASK, prompt="hello world", temperature=None, top_p=None, n=None, stream=None, seed=None, max_tokens=None
    )
    assert got.choices[0].finish_reason in ("stop", "length") and got.usage.completion_tokens <= 16
    chat = httpx.post(
        f"{chatty.url}/v1/chat/completions",
        json={"model": TASK, "messages": [{"role": "user", "content": "hello world"}], **nulls, "max_tokens": None},
        timeout=60,
    )
    assert chat.status_code == 200, chat.text


@SINGLE
def test_ignore_eos_negative_seeds_and_neutral_vllm_fields(chatty: Server) -> None:
    exact = completions(chatty.url, {"prompt": ["hello world", "x"], "max_tokens": 20, "ignore_eos": True})
    assert [c["finish_reason"] for c in exact.json()["choices"]] == ["length", "length"]
    assert exact.json()["usage"]["completion_tokens"] == 40
    seeded = {"prompt": "hello world", "max_tokens": 12, "temperature": 1.0, "seed": -(2**63)}
    first, again = completions(chatty.url, seeded), completions(chatty.url, seeded)
    assert first.status_code == 200 and first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]
    neutral = {
        "ignore_eos": False,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
        "parallel_tool_calls": False,
        "suffix": "",
    }
    assert completions(chatty.url, {"prompt": "x", "max_tokens": 2, **neutral}).status_code == 200


@SINGLE
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": 0}, "echo"),  # 0 == False in Python: compared by type too, so not taken as neutral
        ({"best_of": True}, "best_of"),
        ({"skip_special_tokens": False}, "skip_special_tokens"),
        ({"stream_options": {"include_usage": True, "frobnicate": 1}}, "stream_options.frobnicate"),
        ({"prompt": ["x", 1]}, "prompt"),  # never pydantic's `prompt.str`
        ({"prompt": [[1, 2], "x"]}, "prompt"),
    ],
)
def test_values_that_cannot_be_honoured_are_400_or_422_with_a_clean_param(chatty: Server, extra: dict, param: str):
    r = completions(chatty.url, {"prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == param, r.text


@TOKENIZERS
def test_token_id_prompts_answer_as_their_text(chatty: Server) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(chatty.backbone))
    texts = ["hello world", "another input"]
    ids = tokenizer(texts)["input_ids"]
    want = [
        c["text"]
        for c in completions(chatty.url, {"prompt": texts, "max_tokens": 12, "temperature": 0}).json()["choices"]
    ]
    one = completions(chatty.url, {"prompt": ids[0], "max_tokens": 12, "temperature": 0}).json()
    assert one["choices"][0]["text"] == want[0] and one["usage"]["prompt_tokens"] == len(ids[0])
    both = completions(chatty.url, {"prompt": ids, "max_tokens": 12, "temperature": 0}).json()
    assert [c["text"] for c in both["choices"]] == want
    outside = completions(chatty.url, {"prompt": [5, len(tokenizer)], "max_tokens": 2})
    assert outside.status_code == 400 and "token id" in outside.json()["error"]["message"], outside.text


@TOKENIZERS
def test_include_stop_str_in_output_keeps_the_stop_string(chatty: Server) -> None:
    full = predict(chatty.url, ["hello world"], 24).json()["outputs"][0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    kept = full[: full.index(stop) + len(stop)]
    body = {
        "prompt": "hello world",
        "max_tokens": 24,
        "temperature": 0,
        "stop": [stop],
        "include_stop_str_in_output": True,
    }
    whole = completions(chatty.url, body).json()["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == (kept, "stop")
    assert "".join(c["choices"][0]["text"] for c in chunks(chatty.url, "/v1/completions", body) if c["choices"]) == kept


@TOKENIZERS
def test_continuous_usage_stats_put_usage_in_every_chunk(chatty: Server) -> None:
    body = {
        "prompt": ["hello world", "x"],
        "max_tokens": 10,
        "ignore_eos": True,
        "temperature": 0,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    got = chunks(chatty.url, "/v1/completions", body)
    assert all("usage" in c for c in got)
    generated = [c["usage"]["completion_tokens"] for c in got]
    assert generated == sorted(generated) and generated[-1] == 20
    assert {c["usage"]["prompt_tokens"] for c in got} == {
        completions(chatty.url, body).json()["usage"]["prompt_tokens"]
    }
    plain = chunks(chatty.url, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert sum("usage" in c for c in plain) == 1  # without it: only the last


@SINGLE
def test_head_answers_every_get_route_without_a_body(chatty: Server) -> None:
    for path in ("/metrics", "/v1/models", f"/v1/models/{TASK}", "/healthz", "/readyz", f"/v1/adapters/{TASK}"):
        got, head = httpx.get(chatty.url + path), httpx.head(chatty.url + path)
        assert head.status_code == got.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert httpx.head(f"{chatty.url}/v1/predict").status_code == 405


@SINGLE
def test_series_with_known_labels_exist_at_zero(chatty: Server) -> None:
    samples = metric_samples(chatty.url)
    names = {(n, dict(labels).get("code"), dict(labels).get("source")) for n, labels in samples}
    assert ("kronserve_adapter_load_failures_total", "store_conflict", "upload") in names
    assert ("kronserve_adapter_load_failures_total", "backbone_mismatch", "store") in names
    for tier in ("device", "host"):
        assert samples.get(("kronserve_tier_evictions_total", frozenset({("tier", tier)}))) is not None
    for stage in ("queued", "running"):
        assert samples.get(("kronserve_cancelled_requests_total", frozenset({("stage", stage)}))) is not None


@TOKENIZERS
def test_n_samples_per_prompt_share_one_encoder_pass(chatty: Server, client: openai.OpenAI) -> None:
    """Choice i*n+j is prompt i's j-th sequence, drawn as that prompt alone with seed + j would be; the prompt is
    encoded once and its tokens counted once."""
    body = {"prompt": ["hello world", "another input"], "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 3}
    encoded = lambda: metric_samples(chatty.url)[("kronserve_input_tokens_total", frozenset())]  # noqa: E731
    before = encoded()
    got = completions(chatty.url, body).json()
    prompt = prompt_tokens(chatty, body["prompt"])
    assert encoded() - before == prompt  # each prompt through the encoder once, not n times
    assert [c["index"] for c in got["choices"]] == list(range(6))
    alone = [
        completions(chatty.url, {**body, "prompt": prompt, "n": 1, "seed": 5 + j}).json()
        for prompt in body["prompt"]
        for j in range(3)
    ]
    assert [c["text"] for c in got["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert got["usage"]["prompt_tokens"] == prompt  # each prompt counted once
    assert got["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert len({c["text"] for c in got["choices"][:3]}) > 1  # sampled apart

    streamed = chunks(chatty.url, "/v1/completions", body)  # interleaved: each choice's deltas add up
    texts = ["".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == k) for k in range(6)]
    assert texts == [c["text"] for c in got["choices"]]
    chat = client.chat.completions.create(
        model=TASK, messages=[{"role": "user", "content": "hello world"}], n=3, temperature=1.0, seed=5, max_tokens=12
    )
    assert [c.message.content for c in chat.choices] == [c["text"] for c in got["choices"][:3]]
    assert chat.usage.prompt_tokens == prompt_tokens(chatty, ["hello world"])

    predict = httpx.post(
        f"{chatty.url}/v1/predict",
        json={"task": TASK, "inputs": ["hello world", "x"], "n": 2, "temperature": 1.0, "seed": 5, "max_new_tokens": 6},
        timeout=60,
    ).json()
    assert len(predict["outputs"]) == 4
    too_many = completions(chatty.url, {**body, "n": 9})  # the server's max_beams is 8
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
