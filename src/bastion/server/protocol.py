"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Field names and meanings follow OpenAI's API, plus the vLLM extensions that our
sampler implements (top_k, stop_token_ids, ignore_eos, min_tokens, prompt_logprobs,
include_stop_str_in_output). Range checks live here, in the field declarations, so a
bad value is rejected with the offending field named before anything is tokenized;
errors.py turns those failures into HTTP 400 bodies.

Unknown fields are ignored (OpenAI clients send fields we have no use for, e.g.
`metadata`), but fields that would change the result and that we cannot honour
(n > 1, penalties, logit_bias, tools, ...) are rejected in `unsupported()` rather than
silently dropped: a caller must never get a different distribution than it asked for.

Types are strict, as OpenAI's are: `"max_tokens": "16"`, `"max_tokens": true` and
`"logprobs": true` on completions are 400s, not guesses (a float field still takes an
integer). Every integer is bounded to int64 here, and the bounds that depend on the
served model (vocabulary size, context length) are checked in params.py, so no number
a client can write reaches torch unchecked. The bounds are part of the OpenAPI schema
(`bastion serve --openapi`), which is what the fuzz tests generate requests from.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_serializer

# Token ids, counts and seeds go to torch as int64; bound them here so an absurd JSON
# number is a 400, not an OverflowError deep inside the engine.
I64_MIN, I64_MAX, U64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
MAX_STOP = 64  # stop strings are matched on every detokenized delta
MAX_STOP_TOKEN_IDS = 1024
TokenId = Annotated[int, Field(ge=0, le=I64_MAX)]  # < vocabulary size: checked in params.py
Count = Annotated[int, Field(ge=1, le=I64_MAX)]


class _Request(BaseModel):
    # Booleans are StrictBool: lax parsing would turn strings such as "yes" or "off"
    # into booleans, and a guessed `stream` or `logprobs` is worse than a 400.
    # allow_inf_nan=False: Python's json parser accepts `NaN`; NaN must never reach
    # the sampler (a NaN temperature would fail every comparison we rely on).
    # strict: no str -> int or bool -> int coercion (see the module docstring).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingRequest(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None  # None: the server's default model
    max_tokens: Count | None = None  # <= the context length: params.py
    temperature: float | None = Field(default=None, ge=0.0)  # None: 1.0, as OpenAI; < 1e-5: greedy
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=I64_MAX)  # -1/0: off; <= vocabulary size: params.py
    seed: int | None = Field(default=None, ge=I64_MIN, le=U64_MAX)  # what torch.Generator.manual_seed takes
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: StrictBool = False
    min_tokens: int = Field(default=0, ge=0, le=I64_MAX)
    include_stop_str_in_output: StrictBool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    n: Count = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; never logged
    cleangen: StrictBool | None = None  # Bastion: CleanGen defended decoding (None: the adapter's policy)
    # vLLM's extension: lower is served earlier under --scheduling-policy priority (else must be 0)
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)
    # Accepted so clients that always send the defaults work; non-defaults rejected.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first requested feature we cannot honour, else None."""
        if self.n != 1:
            return "n", "only n=1 is supported; send several requests instead"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---------------------------------------------------------------------------- chat


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Only text parts: an image part fails validation here with a clear 400.
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, str]:
        """What the chat template sees: role and flat text content."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        msg = {"role": self.role, "content": text}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None  # OpenAI's newer name
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format type 'text' is supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true"
        return super().unsupported()

    def logprobs_count(self) -> int | None:
        """SamplingParams.logprobs: None (off) or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------------- completions


class CompletionRequest(_SamplingRequest):
    # A string, a list of token ids, or a batch of either (one choice per prompt).
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: StrictBool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: Count | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: ["text"], [[ids]], or several of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if not self.prompts():
            return "prompt", "prompt must not be empty"
        if self.stream and len(self.prompts()) > 1:
            return "prompt", "streaming supports a single prompt per request"
        return super().unsupported()

    def logprobs_count(self) -> int | None:
        return self.logprobs


# ------------------------------------------------------------------------ responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None  # {"cached_tokens": n}
    cleangen_replaced_tokens: int | None = None  # set when CleanGen defended the request


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprobEntry(BaseModel):
    """vLLM's prompt_logprobs format: token id -> {logprob, rank, decoded_token}."""

    logprob: float
    rank: int | None = None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprobEntry] | None]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None

    @field_serializer("delta")
    def _compact_delta(self, delta: ChatDelta) -> dict[str, Any]:
        # OpenAI omits absent delta fields ({"content": "x"}, and {} on the last chunk).
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    """Also the streaming chunk: OpenAI uses object "text_completion" for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bastion"
    max_model_len: int | None = None
    parent: str | None = None  # base model id when this entry is an adapter
    vetting: str | None = None  # an adapter's gate verdict (pass/warn/fail); None: base model or no gate


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
