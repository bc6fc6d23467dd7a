"""The `openai` engine: attach to a running OpenAI-compatible server by URL.

vLLM, SGLang, llama.cpp's server, Ollama, mlx_vlm.server... anything that
speaks the OpenAI HTTP API. Bodies pass through as bytes; stream events are
forwarded as they arrive, and events that arrived together travel together.

An https:// upstream's certificate is verified against the system's trust
store, or against a CA bundle (`upstream_ca_bundle`); verification is off only
when asked (`upstream_insecure_skip_verify`). A certificate that does not verify
is logged once and named in every answer (the agent's not-ready detail while
it starts, each request's error after), with the setting that fixes it.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import orjson

from kscope_common.multipart import NotMultipart, boundary_of, parts
from node_agent.engines.base import (
    Endpoint,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineUnavailable,
    Usage,
)
from node_agent.engines.http1 import CertificateError, Connection, Http1Pool, HttpError

log = logging.getLogger(__name__)

_JSON_HEADERS = {"Content-Type": "application/json"}
_USAGE_FIELDS = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d+)')
    for name in ("prompt_tokens", "completion_tokens", "total_tokens")
}
_RESPONSES_USAGE_FIELDS = {
    # The Responses API's names for the same counts.
    "prompt_tokens": re.compile(rb'"input_tokens"\s*:\s*(\d+)'),
    "completion_tokens": re.compile(rb'"output_tokens"\s*:\s*(\d+)'),
    "total_tokens": _USAGE_FIELDS["total_tokens"],
}


def usage_of(payload: bytes) -> Usage | None:
    """The usage object of an OpenAI JSON body or chunk (or of a Responses API
    response: input and output tokens), found without parsing the whole
    (possibly large) document; None when it has none."""
    at = payload.rfind(b'"usage"')
    if at < 0:
        return None
    rest = payload[at + 7 :].lstrip()[1:].lstrip()  # skip ':' and spaces
    if not rest.startswith(b"{"):
        return None  # "usage": null
    found = {name: rx.search(rest) for name, rx in _USAGE_FIELDS.items()}
    if found["prompt_tokens"] is None and b'"input_tokens"' in rest:
        found = {name: rx.search(rest) for name, rx in _RESPONSES_USAGE_FIELDS.items()}
    values = {name: int(m.group(1)) if m else 0 for name, m in found.items()}
    return Usage(**values)


def _not_json(content_type: bytes) -> str:
    """The answer's Content-Type when it is not JSON (text, srt or vtt from an
    audio endpoint): the client must get it as the engine labelled it."""
    if not content_type or content_type.startswith(b"application/json"):
        return ""
    return content_type.decode("latin-1")


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split complete SSE events off `buffer`; return their data payloads and
    the incomplete rest."""
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    *events, rest = buffer.split(b"\n\n")
    payloads = []
    for event in events:
        if event.startswith(b"data:") and b"\n" not in event:
            payloads.append(event[5:].lstrip(b" "))  # the common case: one data line
            continue
        lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
        if lines:
            payloads.append(b"\n".join(lines))
    return payloads, rest


def split_whole_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split complete SSE events off `buffer` as they are, every line kept
    (`event:`, `data:`, `id:`), less the blank line that ends each; return
    them and the incomplete rest. For streams whose events have names (the
    Responses API), which the client must get as the engine sent them."""
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    *events, rest = buffer.split(b"\n\n")
    return [event for event in events if event], rest


def renamed_form(body: bytes, content_type: str, model: str) -> bytes:
    """A multipart/form-data body with the value of its `model` field
    replaced (the catalog's upstream_model); every other byte as it was."""
    boundary = boundary_of(content_type.encode("latin-1"))
    if boundary is None:
        return body
    try:
        for part in parts(body, boundary):
            if part.name == b"model":
                return body[: part.start] + model.encode() + body[part.end :]
    except NotMultipart:
        pass  # the engine says what it makes of it
    return body


def tls_context(ca_bundle: str = "", insecure_skip_verify: bool = False) -> ssl.SSLContext:
    """TLS settings for an https upstream: certificates verified against the
    system's trust store, or against `ca_bundle` (a PEM file) when given; not
    verified at all with `insecure_skip_verify`. ValueError for a bundle that
    cannot be read, or for both at once."""
    if ca_bundle and insecure_skip_verify:
        raise ValueError("upstream_ca_bundle and upstream_insecure_skip_verify exclude each other")
    try:
        context = ssl.create_default_context(cafile=ca_bundle or None)
    except (OSError, ssl.SSLError) as exc:  # missing file, or no PEM certificate in it
        raise ValueError(f"upstream_ca_bundle {ca_bundle!r} cannot be used: {exc}") from exc
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _error_from(status: int, raw: bytes) -> EngineError:
    """An EngineError carrying the upstream's OpenAI error object when it sent one."""
    message = raw.decode(errors="replace")[:2000] or f"engine answered HTTP {status}"
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return EngineError(status, message)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        return EngineError(status, str(error.get("message", message)), orjson.dumps(error))
    if isinstance(error, str):  # vLLM's 401 is {"error": "Unauthorized"}
        return EngineError(status, error)
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    return EngineError(status, str(detail) if detail else message)


def _header_safe(value: str) -> bool:
    """Whether `value` can be a header value as it is (no CR, LF or other control)."""
    return 0 < len(value) <= 1024 and value.isascii() and value.isprintable()


def _header(name: bytes, value: str) -> bytes:
    return name + b": " + value.encode() + b"\r\n"


class OpenAIUpstream:
    """Forwards requests to an OpenAI-compatible server over keep-alive HTTP."""

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        served_model: str,
        upstream_model: str = "",
        timeout_s: float = 600.0,
        api_key: str = "",
        ca_bundle: str = "",
        insecure_skip_verify: bool = False,
    ):
        self.url = base_url.rstrip("/")
        self._rename = upstream_model if upstream_model and upstream_model != served_model else ""
        self._timeout_s = timeout_s
        self._headers = dict(_JSON_HEADERS)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"engine URLs must be http:// or https://: {base_url!r}")
        if parts.scheme == "http" and (ca_bundle or insecure_skip_verify):
            raise ValueError(f"TLS settings given for a plain http:// engine URL: {base_url!r}")
        https = parts.scheme == "https"
        self._tls = tls_context(ca_bundle, insecure_skip_verify) if https else None
        if insecure_skip_verify:
            log.warning("the certificate of %s will not be verified "
                        "(upstream_insecure_skip_verify)", self.url)  # fmt: skip
        default_port = 80 if self._tls is None else 443
        self._pool = Http1Pool(parts.hostname, parts.port or default_port, self._tls)
        self.health_problem = ""
        """Why the upstream cannot become healthy as configured (its certificate
        does not verify), for the agent's not-ready detail; "" otherwise."""
        self._said = ""
        # The /v1 endpoints go under the URL's path, as ever; the others under
        # the engine's root: the URL without its trailing /v1 (vLLM serves
        # /tokenize, /pooling, /rerank … beside /v1).
        self._v1_prefix = parts.path
        self._root_prefix = parts.path.removesuffix("/v1")
        self._request_lines: dict[Endpoint, bytes] = {}
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._fixed_headers = f"Host: {parts.netloc}\r\n{auth}".encode()
        self._json_headers = self._fixed_headers + b"Content-Type: application/json\r\n"

    def _client(self) -> aiohttp.ClientSession:
        """aiohttp, for health checks only (off the token path)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, keepalive_timeout=60, ssl=True if self._tls is None else self._tls
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=5, sock_read=self._timeout_s
                ),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def start(self) -> None:
        self._client()

    async def healthy(self) -> bool:
        try:
            async with self._client().get(
                self.url + "/models", headers=self._headers, timeout=aiohttp.ClientTimeout(total=3)
            ) as resp:
                ok = resp.status == 200
        except aiohttp.ClientConnectorCertificateError as exc:
            cause = exc.certificate_error
            why = getattr(cause, "verify_message", "") or getattr(cause, "reason", "") or cause
            self._certificate_failed(str(why))
            return False
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        self.health_problem = ""
        if ok:
            self._said = ""  # a certificate problem that comes back is logged again
        return ok

    def _certificate_failed(self, why: str) -> str:
        """Record, and log once while it lasts, that the upstream's certificate
        did not verify; return the message for operators and clients."""
        message = (
            f"upstream certificate verify failed: the TLS certificate of {self.url} could "
            f"not be verified ({why}); set the model's upstream_ca_bundle to the CA "
            "that issued it"
        )
        self.health_problem = message
        if message != self._said:
            self._said = message
            log.error("%s", message)
        return message

    def failure(self) -> str:
        return ""

    def _body_for_upstream(self, request: EngineRequest) -> bytes:
        body = request.body
        if not self._rename:
            return body
        if request.content_type.lower().startswith("multipart/"):
            return renamed_form(body, request.content_type, self._rename)
        parsed = orjson.loads(body)
        parsed["model"] = self._rename
        return orjson.dumps(parsed)

    def path_of(self, endpoint: Endpoint) -> str:
        """Where `endpoint` is on this upstream."""
        if endpoint.startswith("/v1/"):
            return self._v1_prefix + endpoint[3:]
        return self._root_prefix + endpoint

    def _request_line(self, endpoint: Endpoint) -> bytes:
        line = self._request_lines.get(endpoint)
        if line is None:
            line = f"POST {self.path_of(endpoint)} HTTP/1.1\r\n".encode()
            self._request_lines[endpoint] = line
        return line

    def _request(self, request: EngineRequest) -> bytes:
        body = self._body_for_upstream(request)
        if request.content_type:
            headers = self._fixed_headers + _header(b"Content-Type", request.content_type)
        else:
            headers = self._json_headers
        rid = request.request_id
        # vLLM takes X-Request-Id as its request id: its log lines carry ours.
        # An id that could break the header is left out (the facade never sends one).
        identity = b"X-Request-Id: " + rid.encode() + b"\r\n" if _header_safe(rid) else b""
        return b"".join(
            [
                self._request_line(request.endpoint), headers, identity,
                b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body,
            ]
        )  # fmt: skip

    async def _send(self, request: bytes) -> Connection:
        """Send on a keep-alive connection and wait for the response headers. A
        reused connection the server had already closed is retried once on a new one."""
        for attempt in range(2):
            conn: Connection | None = None
            try:
                conn = await self._pool.acquire()
                conn.send(request)
                await conn.headers(self._timeout_s)
                return conn
            except CertificateError as exc:
                raise EngineUnavailable(self._certificate_failed(exc.why)) from exc
            except HttpError as exc:
                if conn is not None:
                    conn.close()
                    if attempt == 0 and conn.reused and not conn.received_any:
                        continue
                raise EngineUnavailable(f"engine unreachable at {self.url}: {exc}") from exc
        raise AssertionError("unreachable")

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if request.content_type and not _header_safe(request.content_type):
            raise EngineError(400, "the request's Content-Type is not a valid header value",
                              error_type="invalid_request_error")  # fmt: skip
        conn = await self._send(self._request(request))
        try:
            if conn.status >= 400:
                raise _error_from(conn.status, await conn.read_all(self._timeout_s))
            if not request.stream or not conn.content_type.startswith(b"text/event-stream"):
                raw = await conn.read_all(self._timeout_s)
                labelled = "" if request.endpoint.json_only else _not_json(conn.content_type)
                yield EngineOutput([raw], usage_of(raw), labelled)
                return
            # A Responses stream's events pass whole (their `event:` lines and
            # all); the others' as their `data:` payloads, less the [DONE].
            whole = request.endpoint.whole_events
            split = split_whole_events if whole else split_events
            rest = b""
            while (data := await conn.read(self._timeout_s)) is not None:
                payloads, rest = split(rest + data if rest else data)
                chunks: list[bytes] = []
                usage = None
                for payload in payloads:
                    if payload == b"[DONE]":
                        continue
                    chunks.append(payload)
                    if b'"usage"' in payload:
                        usage = usage_of(payload) or usage
                if chunks:
                    yield EngineOutput(chunks, usage)
            if whole and rest.strip():  # a last event without the blank line that ends it
                yield EngineOutput([rest.rstrip(b"\r\n")], usage_of(rest))
        except HttpError as exc:
            raise EngineUnavailable(f"engine connection failed mid-request: {exc}") from exc
        finally:
            # An unfinished response's connection is closed, not reused: that is
            # how an OpenAI server learns the client went away and aborts the request.
            self._pool.release(conn)

    async def stop(self) -> None:
        self._pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
