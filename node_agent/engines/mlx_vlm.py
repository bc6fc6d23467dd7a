"""The `mlx_vlm` engine: MLX-VLM in the agent's own process.

Chat requests with text and images (https://, http:// and data: URLs, several
per request, in any user turn) are answered as OpenAI bodies or stream chunks.

MLX work runs on one dedicated thread, never on the event loop: MLX streams are
thread-local, and the model object keeps per-request state (Qwen2-VL's rope
deltas), so requests are generated one after another. The request queue in
front of the engine (node_agent/queue.py, max_concurrency 1 by default) decides
who waits. Each token crosses to the event loop as it is generated; tokens that
arrived together travel together. Cancelling a request sets a flag the thread
checks after every token, so generation stops at the next token.

mlx-vlm is imported on the engine thread when the engine starts, so agents of
other engines never need it installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from node_agent.engines.base import (
    Endpoint,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineUnavailable,
    Usage,
)
from node_agent.engines.openai_chat import (
    ChatRenderer,
    ChatRequest,
    StopMatcher,
    invalid,
    parse_chat_request,
)
from node_agent.images import ImageError, ImageFetcher, ImageLimits

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    model: Any
    processor: Any
    config: Any


@dataclass(frozen=True)
class _Token:
    """Text the thread generated, with the counts so far."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


@dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True)
class _Ended:
    """The thread is done with the job; normally after a token with a finish reason."""


_Event = _Token | _Failed | _Ended


@dataclass(eq=False)
class _Job:
    """One request's generation, shared by the event loop and the MLX thread."""

    prompt: str
    images: list[Any]
    request: ChatRequest
    emit: Callable[[_Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


def _load(model_path: str) -> _Loaded:
    """Load weights and processor, then generate two tokens so the first real
    request does not pay for lazy initialisation. Runs on the MLX thread."""
    from mlx_vlm import apply_chat_template, load, stream_generate

    model, processor = load(model_path)
    prompt = apply_chat_template(processor, model.config, [{"role": "user", "content": "hi"}])
    for _ in stream_generate(model, processor, prompt, max_tokens=2, temperature=0.0):
        pass
    return _Loaded(model, processor, model.config)


def _generate(loaded: _Loaded, job: _Job) -> None:
    """Generate one request on the MLX thread, emitting every token."""
    if job.cancelled.is_set():
        return  # the client left while this job waited for the thread
    import mlx.core as mx
    from mlx_vlm import stream_generate

    request = job.request
    kwargs = dict(request.sampling)
    if request.seed is not None:
        # Seeded sampling: mlx-vlm's own seeded sampler where it applies, and the
        # global generator for the others (this thread is the only MLX user).
        mx.random.seed(request.seed % 2**32)
        kwargs["seed"] = request.seed % 2**32
    results = stream_generate(
        loaded.model,
        loaded.processor,
        job.prompt,
        image=job.images or None,
        max_tokens=request.max_tokens,
        **kwargs,
    )
    try:
        text = IncrementalText(
            getattr(loaded.processor, "tokenizer", loaded.processor),
            skip_special_tokens=bool(kwargs.get("skip_special_tokens", True)),
        )
        for result in results:
            # mlx-vlm's own text segments end at word boundaries; decoding the
            # ids ourselves streams every token. Its last result repeats the last
            # token (or names the EOS token) only to say why generation ended.
            if result.finish_reason is None:
                token = result.token
                delta = text.add(int(token.item() if hasattr(token, "item") else token))
            else:
                delta = text.rest()
            job.emit(
                _Token(delta, result.prompt_tokens, result.generation_tokens, result.finish_reason)
            )
            if job.cancelled.is_set():
                return
    except Exception as exc:  # reported to the request, which fails with it
        log.warning("generation failed: %r", exc, exc_info=not isinstance(exc, ValueError))
        job.emit(_Failed(exc))
        return
    finally:
        results.close()  # runs mlx-vlm's clean-up even when we stop early
    job.emit(_Ended())


class IncrementalText:
    """Text of a growing token sequence, one delta per token. Decodes a short
    window, not the whole sequence, and holds back a delta that ends inside a
    multi-byte character (the replacement character) until it is complete."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window whose text was emitted already
        self._read = 0  # end of that window

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=self._skip)
        return text

    def add(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def rest(self) -> str:
        """What is still held back, at the end."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


class MlxVlmEngine:
    """A vision-language model served by MLX-VLM in this process."""

    kind = "mlx_vlm"
    url = ""

    def __init__(self, model_path: str, served_model: str, image_limits: ImageLimits | None = None):
        self._model_path = model_path
        self._served_model = served_model
        self._images = ImageFetcher(image_limits)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self._loading: asyncio.Future[_Loaded] | None = None
        self._jobs: set[_Job] = set()

    async def start(self) -> None:
        log.info("loading MLX-VLM model from %s", self._model_path)
        self._loading = asyncio.get_running_loop().run_in_executor(
            self._thread, _load, self._model_path
        )

    async def healthy(self) -> bool:
        return self._loaded() is not None

    def failure(self) -> str:
        loading = self._loading
        if loading is not None and loading.done() and loading.exception() is not None:
            return f"cannot load the MLX-VLM model at {self._model_path}: {loading.exception()}"
        return ""

    def _loaded(self) -> _Loaded | None:
        loading = self._loading
        if loading is None or not loading.done() or loading.exception() is not None:
            return None
        return loading.result()

    async def generate(self, call: EngineRequest) -> AsyncIterator[EngineOutput]:
        if call.endpoint is not Endpoint.CHAT:
            raise EngineError(
                404, f"the mlx_vlm engine serves /v1/chat/completions only, not {call.endpoint}",
                error_type="invalid_request_error", code="unsupported_endpoint",
            )  # fmt: skip
        stream = call.stream
        loaded = self._loaded()
        if loaded is None:
            raise EngineUnavailable("the MLX-VLM model is not loaded yet")
        request = parse_chat_request(call.body, self._served_model)
        try:
            images = await self._images.load_all(request.image_urls)
        except ImageError as exc:
            raise invalid(str(exc), "messages", code="invalid_image") from exc
        prompt = self._prompt(loaded, request, len(images))
        async for output in self._run(loaded, _Job(prompt, images, request, _no_emit), stream):
            yield output

    def _prompt(self, loaded: _Loaded, request: ChatRequest, images: int) -> str:
        from mlx_vlm import apply_chat_template

        try:
            prompt = apply_chat_template(
                loaded.processor, loaded.config, request.messages, num_images=images
            )
        except Exception as exc:  # the model's own template refused these messages
            raise invalid(f"the model's chat template rejects these messages: {exc}",
                          "messages") from exc  # fmt: skip
        if not isinstance(prompt, str):
            raise invalid("the model's chat template did not produce a text prompt", "messages")
        return prompt

    async def _run(self, loaded: _Loaded, job: _Job, stream: bool) -> AsyncIterator[EngineOutput]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Event] = asyncio.Queue()

        def emit(event: _Event) -> None:
            # Called on the MLX thread; a closed loop means the agent is stopping.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        job.emit = emit
        self._jobs.add(job)
        done = loop.run_in_executor(self._thread, _generate, loaded, job)
        done.add_done_callback(_log_unexpected)
        render = _Render(job.request, stream)
        try:
            while not render.finished:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                chunks = render.events(batch)
                if render.finished:
                    job.cancelled.set()  # a stop string matched: no more tokens needed
                if chunks:
                    yield EngineOutput(chunks, render.usage_if_final())
        finally:
            job.cancelled.set()
            self._jobs.discard(job)

    async def stop(self) -> None:
        for job in self._jobs:
            job.cancelled.set()
        await self._images.close()
        # Do not wait: a generation ends at its next token and the thread exits
        # after it; waiting here would hold the agent's shutdown for no gain.
        self._thread.shutdown(wait=False, cancel_futures=True)


def _no_emit(event: _Event) -> None:
    raise RuntimeError("job emitted before it was started")


def _log_unexpected(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("MLX generation thread failed", exc_info=done.exception())


class _Render:
    """Turns the thread's events into OpenAI chunks (stream) or one body."""

    def __init__(self, request: ChatRequest, stream: bool):
        self._stream = stream
        self._renderer = ChatRenderer(request.model, request.include_usage)
        self._stops = StopMatcher(request.stop)
        self._text: list[str] = []
        self._usage = Usage()
        self._started = False
        self.finished = False

    def usage_if_final(self) -> Usage | None:
        return self._usage if self.finished else None

    def events(self, batch: list[_Event]) -> list[bytes]:
        chunks: list[bytes] = []
        if self._stream and not self._started:
            chunks.append(self._renderer.delta({"role": "assistant", "content": ""}))
            self._started = True
        for event in batch:
            if self.finished:
                break
            if isinstance(event, _Failed):
                if isinstance(event.error, ValueError):  # mlx-vlm's word for bad input
                    raise invalid(f"the model cannot take this input: {event.error}",
                                  "messages") from event.error  # fmt: skip
                raise EngineError(500, f"generation failed: {event.error}") from event.error
            if isinstance(event, _Token):
                chunks += self._token(event)
            elif isinstance(event, _Ended):  # no final token came: never leave the client hanging
                chunks += self._finish("stop")
        return chunks

    def _token(self, token: _Token) -> list[bytes]:
        self._usage = Usage(
            token.prompt_tokens,
            token.completion_tokens,
            token.prompt_tokens + token.completion_tokens,
        )
        text, stopped = self._stops.push(token.text)
        chunks = self._text_out(text)
        if stopped:
            return chunks + self._finish("stop")
        if token.finish_reason is not None:
            return chunks + self._text_out(self._stops.flush()) + self._finish(token.finish_reason)
        return chunks

    def _text_out(self, text: str) -> list[bytes]:
        if not text:
            return []
        if not self._stream:
            self._text.append(text)
            return []
        return [self._renderer.delta({"content": text})]

    def _finish(self, reason: str) -> list[bytes]:
        self.finished = True
        if not self._stream:
            return [self._renderer.completion("".join(self._text), reason, self._usage)]
        chunks = [self._renderer.delta({}, reason)]
        if self._renderer.include_usage:
            chunks.append(self._renderer.usage_chunk(self._usage))
        return chunks
