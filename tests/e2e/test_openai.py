"""The OpenAI API through the real `openai` client against a real server (one process and a cluster), and
streaming on kronserve's own `/v1/predict`."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from kronserve_client import AsyncKronserveClient, KronserveClient, PredictResult, Sampling, StreamDelta

from ..reliability.conftest import metric, metric_samples
from ..test_cli import console
from .conftest import CHATTY, EVERYWHERE, SINGLE, TOKENIZERS, Server, prompt_tokens

TASK = CHATTY


def predict(url: str, inputs: list[str], n: int, **extra) -> httpx.Response:
    body = {"task": TASK, "inputs": inputs, "max_new_tokens": n, **extra}
    return httpx.post(f"{url}/v1/predict", json=body, timeout=60)


def sse(url: str, path: str, body: dict) -> list[tuple[str | None, str, float]]:
    """(event name, data, arrival time) of each server-sent event."""
    out, name = [], None
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, line[6:], time.monotonic()))
                name = None
    return out


def test_models_list_the_tasks(client: openai.OpenAI, chatty: Server) -> None:
    ids = {m.id for m in client.models.list()}
    assert TASK in ids
    model = client.models.retrieve(TASK)
    assert model.id == TASK and model.object == "model" and model.owned_by == "kronserve" and model.created > 0
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-task")
    assert e.value.body["code"] == "model_not_found"


@EVERYWHERE
def test_completion_equals_predict_and_names_its_version(client: openai.OpenAI, chatty: Server) -> None:
    want = predict(chatty.url, ["hello world", "another input"], 12).json()
    raw = client.completions.with_raw_response.create(
        model=TASK, prompt=["hello world", "another input"], temperature=0, max_tokens=12
    )
    got = raw.parse()
    assert [c.text for c in got.choices] == want["outputs"] and any(want["outputs"])
    assert raw.headers["x-kronserve-version"] == str(want["version"])
    assert got.object == "text_completion" and got.model == TASK
    assert [c.finish_reason for c in got.choices] == ["length", "length"]
    assert got.usage.completion_tokens == 24
    assert got.usage.prompt_tokens == prompt_tokens(chatty, ["hello world", "another input"])


def test_completion_stream_arrives_as_decoded_and_adds_up(client: openai.OpenAI, chatty: Server) -> None:
    """Chunks arrive while the generation runs, not in one burst at its end. The whole generation takes ~0.5 s on
    the tiny model, so a busy 2-core CI box can starve the reading client for all of it once: the stream must
    arrive incrementally in one of three tries (a server that buffered its stream fails all three)."""
    want = predict(chatty.url, ["hello world"], 64, min_new_tokens=64).json()["outputs"][0]
    timings = []
    for _ in range(3):
        started = time.monotonic()
        arrivals, text, finish = [], "", None
        for chunk in client.completions.create(
            model=TASK, prompt="hello world", temperature=0, max_tokens=64, stream=True, extra_body={"min_tokens": 64}
        ):
            arrivals.append(time.monotonic())
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        assert text == want and finish == "length"
        total = arrivals[-1] - started
        timings.append((len(arrivals), arrivals[0] - started, total))
        if len(arrivals) > 8 and arrivals[0] - started < total / 2:
            return
    raise AssertionError(f"every stream arrived in one burst at its end: (chunks, first, total) = {timings}")


@EVERYWHERE
def test_chat_completion_whole_and_streamed(client: openai.OpenAI, chatty: Server) -> None:
    want = predict(chatty.url, ["hello world"], 10).json()["outputs"][0]
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "hello world"}]
    whole = client.chat.completions.create(model=TASK, messages=messages, temperature=0, max_tokens=10)
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=TASK,
            messages=messages,
            temperature=0,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 10


@SINGLE
@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"echo": True}, 400, "echo"),
        ({"best_of": 3}, 400, "best_of"),
        ({"n": 9}, 400, "n"),
        ({"tools": [{"type": "function"}]}, 400, "tools"),
        ({"not_a_field": 1}, 400, "not_a_field"),
        ({"temperature": "hot"}, 422, "temperature"),
        ({"max_tokens": 100_000}, 400, "max_tokens"),
        ({"min_tokens": 9, "max_tokens": 3}, 400, "min_tokens"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(chatty: Server, extra: dict, status: int, param: str) -> None:
    before = metric(chatty.url, "kronserve_queue_wait_seconds_count")
    body = {"model": TASK, "prompt": "x", **extra}
    r = httpx.post(f"{chatty.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert metric(chatty.url, "kronserve_queue_wait_seconds_count") == before  # nothing queued


@SINGLE
def test_unknown_model_and_bad_chat_input_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-task", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=TASK, messages=[{"role": "system", "content": "no user"}])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=TASK, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}
        )
    assert e.value.body["param"] == "response_format"


@TOKENIZERS
def test_stop_strings_end_the_text_before_them(chatty: Server, client: openai.OpenAI) -> None:
    full = predict(chatty.url, ["hello world"], 24).json()["outputs"][0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full[: full.index(stop)]
    got = client.completions.create(model=TASK, prompt="hello world", temperature=0, max_tokens=24, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=TASK, prompt="hello world", temperature=0, max_tokens=24, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut


@EVERYWHERE
def test_predict_streams_deltas_that_add_up_to_the_answer(chatty: Server) -> None:
    inputs = ["hello world", "another input"]
    want = predict(chatty.url, inputs, 16).json()
    events = sse(chatty.url, "/v1/predict", {"task": TASK, "inputs": inputs, "max_new_tokens": 16, "stream": True})
    deltas = [json.loads(d) for name, d, _ in events if name is None]
    texts = ["".join(d["text"] for d in deltas if d["index"] == i) for i in range(2)]
    done = [json.loads(d) for name, d, _ in events if name == "done"]
    assert texts == want["outputs"] and done == [want]
    with httpx.stream("POST", f"{chatty.url}/v1/predict", json={"task": "nope", "inputs": ["x"], "stream": True}) as r:
        assert r.status_code == 404  # an error before the stream begins is a plain error answer


def cancelled_running(url: str) -> float:
    """Rows dropped because their caller left, summed over replicas (a cluster labels each replica's samples)."""
    samples = metric_samples(url).items()
    return sum(
        v for (n, labels), v in samples if n == "kronserve_cancelled_requests_total" and ("stage", "running") in labels
    )


def test_a_client_that_leaves_a_stream_frees_its_row(chatty: Server) -> None:
    before = cancelled_running(chatty.url)
    body = {
        "task": TASK,
        "inputs": ["hello world"] * 8,
        "max_new_tokens": 512,
        "min_new_tokens": 512,
        "num_beams": 1,
        "stream": True,
    }
    with httpx.stream("POST", f"{chatty.url}/v1/predict", json=body, timeout=60) as r:
        next(r.iter_lines())  # the first delta came: the rows are running; leave
    deadline = time.monotonic() + 20
    while cancelled_running(chatty.url) <= before:
        assert time.monotonic() < deadline, "the abandoned stream kept its rows running"
        time.sleep(0.05)


@SINGLE
def test_the_python_client_and_cli_stream_and_sample(chatty: Server) -> None:
    inputs = ["hello world", "another input"]
    with KronserveClient(chatty.url) as c:
        whole = c.predict(TASK, inputs, max_new_tokens=12)
        events = list(c.predict_stream(TASK, inputs, max_new_tokens=12))
        seeded = Sampling(temperature=1.0, top_k=20, seed=3)
        assert c.predict(TASK, inputs, 12, sampling=seeded) == c.predict(TASK, inputs, 12, sampling=seeded)
    deltas = [e for e in events if isinstance(e, StreamDelta)]
    assert events[-1] == whole and isinstance(events[-1], PredictResult)
    assert ["".join(d.text for d in deltas if d.index == i) for i in range(2)] == whole.outputs

    async def run() -> list:
        async with AsyncKronserveClient(chatty.url) as c:
            return [e async for e in c.predict_stream(TASK, inputs[:1], max_new_tokens=12)]

    assert asyncio.run(run())[-1].outputs == whole.outputs[:1]
    cli = console(
        "kronserve-client", "--url", chatty.url, "predict", TASK, inputs[0], "--max-new-tokens", "12", "--stream"
    )
    assert cli.returncode == 0 and cli.stdout == whole.outputs[0] + "\n", cli.stderr
