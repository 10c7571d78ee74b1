"""Request and response bodies of the OpenAI-compatible API (pydantic), plus the ``logo`` extension.

Requests are strict: a wrong type is refused rather than coerced, and an unknown field is refused by name
(OpenAI's own API does the same), so a typo never silently changes a request.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator
from pydantic_core import PydanticCustomError

_RANGE_ERRORS = {"finite_number", "greater_than", "greater_than_equal", "less_than_equal"}


def _number(low: float, high: float, above: bool = False):
    """A float from ``low`` (above it if ``above``) to ``high``. NaN, an infinity or a value outside gets one message
    that says the whole range (pydantic's names one bound: NaN would be "less than or equal to 2")."""
    says = f"must be a finite number {'above' if above else 'from'} {low:g} {'and at most' if above else 'to'} {high:g}"

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError as err:
            if err.errors()[0]["type"] in _RANGE_ERRORS:
                raise PydanticCustomError("out_of_range", says + ", got {value}", {"value": value}) from None
            raise

    return Annotated[float, Field(gt=low) if above else Field(ge=low), Field(le=high, allow_inf_nan=False),
                     WrapValidator(check)]


Temperature = _number(0, 2)
TopP = _number(0, 1, above=True)
Penalty = _number(-2, 2)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LogoOptions(_Strict):
    """The ``logo`` extension object (the ``openai`` client sends it through ``extra_body={"logo": {...}}``)."""

    k: int | None = Field(None, ge=1, description="Adapters per request when LoGo routes it.")
    strategy: Literal["norm", "entropy"] | None = Field(None, description="LoGo's scoring strategy.")
    base: bool = Field(False, description="Answer with the base model, no adapter.")
    adapters: dict[str, float] | None = Field(None, description="An explicit mixture {adapter name: weight}.")


class StreamOptions(_Strict):
    include_usage: bool = False
    """End the stream with a chunk of no choices carrying the request's usage (as OpenAI)."""


class _Generation(_Strict):
    """The sampling fields both endpoints share (OpenAI's names and defaults; as OpenAI, an explicit null means
    the default)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or cls.model_fields.get(k) is None
                    or cls.model_fields[k].is_required()}
        return data

    model: str | None = None
    """``logo`` (or unset): LoGo routes; the base model's id: no adapter; an adapter's name: that adapter."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 1.0
    """0, or anything below ``GREEDY_BELOW`` (1e-5), is greedy."""
    top_p: TopP = 1.0
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    """OpenAI's: subtract this from the logit of every token the choice has generated so far."""
    frequency_penalty: Penalty = 0.0
    """OpenAI's: subtract this times the number of times the choice has generated the token so far."""
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    """Only with ``stream``."""
    user: str | None = None
    logo: LogoOptions | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str]
    logprobs: int | None = None
    """Accepted only unset (null): this server returns no log probabilities."""


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    """``developer`` (OpenAI's newer name for system instructions) reaches the chat template as ``system``."""
    content: str | list[TextPart] | None
    """Null only for an assistant message (as OpenAI)."""
    name: str | None = None


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    """Accepted only false or unset: this server returns no log probabilities."""
    top_logprobs: int | None = None
    """Accepted only 0 or unset (it needs ``logprobs``)."""


# ----------------------------------------------------------------- responses
class SelectedAdapter(BaseModel):
    name: str
    weight: float
    score: float | None = None
    """LoGo's score (None when the client fixed the mixture)."""


class LogoInfo(BaseModel):
    selected: list[SelectedAdapter]
    abstained: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None
    logo: LogoInfo | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    logo: LogoInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    logo: LogoInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    logo: LogoInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class AdapterCard(BaseModel):
    name: str
    rank: int
    targets: list[str]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
