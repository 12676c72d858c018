"""The OpenAI request bodies kronserve accepts, and the fields it refuses by name.

Every task with an active version is a `model`. A field kronserve cannot honour is refused (400) rather
than ignored: the OpenAI fields below, with the value they may take; any field not known at all, too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from ..messages import MAX_LOGPROBS

# OpenAI (and vLLM) fields kronserve does not implement: accepted only with their neutral value (compared by type and
# value: `0` is not `False`).
NEUTRAL: dict[str, Any] = {
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # with no tools, either value means nothing
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}


def is_neutral(name: str, value: Any) -> bool:
    return any(type(value) is type(n) and value == n for n in NEUTRAL[name])


class _Nullable(BaseModel):
    """An explicit `null` means the field's default, as in OpenAI's schema (clients send nulls for what they leave
    unset); unknown fields are kept (`extra="allow"`) so the route can name them in its 400."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(_Nullable):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(default=False, description="vLLM extension: usage in every chunk")


class _Sampling(_Nullable):
    """Fields both routes share."""

    model: str
    temperature: float = Field(default=1.0, ge=0, le=2, description="OpenAI's default 1.0 samples; 0 is greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1, description="vLLM extension: keep the k most likely ids (0 or -1: all)")
    min_tokens: int = Field(default=0, ge=0, description="vLLM extension: no end of sequence before this many")
    n: int = Field(default=1, ge=1, description="choices per prompt, sampled apart (at most max_beams)")
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings; the text ends before one")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="any int64, as OpenAI's")
    ignore_eos: bool = Field(default=False, description="vLLM extension: true generates exactly max_tokens")
    include_stop_str_in_output: bool = Field(default=False, description="vLLM extension: keep the stop string")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="accepted and ignored")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    logprobs: StrictInt | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="each token's log-probability and this many alternatives"
    )
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="one input, or a list of inputs (a choice each); as text or as token ids"
    )
    max_tokens: int | None = Field(default=16, ge=1, description="OpenAI's default 16")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="the input is the last user message's content")
    logprobs: StrictBool = Field(default=False, description="each token's log-probability")
    top_logprobs: StrictInt | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="with logprobs: this many alternatives per token"
    )
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class OpenAIError(BaseModel):
    message: str = Field(description="what is wrong, for a person")
    type: str = Field(description="invalid_request_error, authentication_error or server_error")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str = Field(description="kronserve's error code, or model_not_found / unsupported_parameter")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError
