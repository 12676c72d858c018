"""LiteLLM, as its users call an OpenAI-compatible server (`openai/<task>` with `api_base`): sync, async and
streamed chat, and text completions, answered as kronserve's own routes answer."""

from __future__ import annotations

import asyncio
import os

from .conftest import CHATTY as TASK
from .conftest import SINGLE, Server
from .test_openai import predict

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its model price list, from the package: no download
import litellm  # after the setting above

pytestmark = SINGLE
MESSAGES = [{"role": "user", "content": "hello world"}]


def test_litellm_chat_sync_async_and_streamed(chatty: Server) -> None:
    want = predict(chatty.url, ["hello world"], 10).json()["outputs"][0]
    common = {"model": f"openai/{TASK}", "api_base": f"{chatty.url}/v1", "api_key": "unused", "max_tokens": 10}
    whole = litellm.completion(messages=MESSAGES, temperature=0, **common)
    assert whole.choices[0].message.content == want and whole.usage.completion_tokens == 10
    later = asyncio.run(litellm.acompletion(messages=MESSAGES, temperature=0, **common))
    assert later.choices[0].message.content == want
    chunks = litellm.completion(messages=MESSAGES, temperature=0, stream=True, **common)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    text = litellm.text_completion(prompt="hello world", temperature=0, **common)
    assert text.choices[0].text == want
