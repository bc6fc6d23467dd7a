"""The facade's judgement before routing (facade/capabilities.py), routing by
requirement and names (facade/routing.py), and /v1/models per key
(facade/models_api.py)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from facade.auth import GRANT_SCOPE_KEY, Grant
from facade.capabilities import (
    FALLBACK_CHARS_PER_TOKEN,
    Requirement,
    check,
    refusal,
    requirement_for,
    requirement_of,
)
from facade.errors import ApiError
from facade.models_api import models_router
from facade.routing import RouteTable
from kscope.v1 import control_pb2
from kscope_common.capabilities import Capabilities, LoraAdapter

CHAT = "/v1/chat/completions"
TEXT_MODEL = Capabilities(
    endpoints=frozenset({"chat_completions", "completions", "responses", "tokenize"}),
    input_modalities=frozenset({"text"}),
    tools=False,
    structured_output=True,
    max_model_len=256,
    max_chars_per_token=10,
    engine="vllm",
)
HI = [{"role": "user", "content": "hi"}]


def _image(url: str = "data:image/png;base64,AAAA") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


# --- refusals ------------------------------------------------------------------------------


def test_an_endpoint_the_model_does_not_offer_is_404() -> None:
    error = check("/v1/embeddings", {"model": "tiny", "input": "x"}, "tiny", TEXT_MODEL)
    assert error is not None
    assert (error.status, error.message) == (404, "model 'tiny' does not offer /v1/embeddings")
    assert orjson.loads(error.body())["error"]["code"] == "unsupported_endpoint"
    assert check(CHAT, {"messages": HI}, "tiny", TEXT_MODEL) is None


def test_image_parts_to_a_text_only_model_are_400_naming_image_input() -> None:
    for part in ("image_url", "input_image"):
        messages = [{"role": "user", "content": [{"type": part, "image_url": {"url": "x"}}]}]
        error = check(CHAT, {"messages": messages}, "llama-8b", TEXT_MODEL)
        assert error is not None
        assert (error.status, error.message) == (
            400,
            "model 'llama-8b' does not accept image input",
        )
    vision = Capabilities(input_modalities=frozenset({"text", "image"}))
    assert check(CHAT, {"messages": _image()}, "vlm", vision) is None


def test_audio_parts_are_refused_where_audio_is_not_accepted() -> None:
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    error = check(CHAT, {"messages": messages}, "tiny", TEXT_MODEL)
    assert error is not None and error.message == "model 'tiny' does not accept audio input"


def test_image_input_in_a_responses_request() -> None:
    items = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
    error = check("/v1/responses", {"input": items}, "tiny", TEXT_MODEL)
    assert error is not None and error.message == "model 'tiny' does not accept image input"


def test_tools_to_a_model_without_tool_calling_are_400() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    error = check(CHAT, {"messages": HI, "tools": tools}, "tiny", TEXT_MODEL)
    assert error is not None
    assert error.status == 400 and error.param == "tools"
    assert error.message == "model 'tiny' does not support tool calling ('tools')"
    # Tools that may not be called, or none at all, need no tool calling.
    assert (
        check(CHAT, {"messages": HI, "tools": tools, "tool_choice": "none"}, "t", TEXT_MODEL)
        is None
    )
    assert check(CHAT, {"messages": HI, "tools": []}, "tiny", TEXT_MODEL) is None
    assert check(CHAT, {"messages": HI, "tools": tools}, "t", Capabilities(tools=True)) is None


def test_structured_output_to_a_model_without_it_is_400() -> None:
    no_structure = Capabilities(structured_output=False)
    for kind in ("json_schema", "json_object"):
        body = {"messages": HI, "response_format": {"type": kind, "json_schema": {}}}
        error = check(CHAT, body, "mlx", no_structure)
        assert error is not None and error.param == "response_format"
        assert (
            error.message
            == f"model 'mlx' does not support structured output (response_format {kind})"
        )
    text = {"messages": HI, "response_format": {"type": "text"}}
    assert check(CHAT, text, "mlx", no_structure) is None
    body = {"messages": HI, "response_format": {"type": "json_schema"}}
    assert check(CHAT, body, "tiny", TEXT_MODEL) is None


def test_nothing_known_refuses_nothing() -> None:
    everything = {
        "messages": _image(),
        "tools": [{"type": "function"}],
        "response_format": {"type": "json_schema"},
    }
    assert check(CHAT, everything, "m", None) is None
    assert check(CHAT, everything, "m", Capabilities()) is None
    assert check("/v1/unknown/path", {"x": 1}, "m", TEXT_MODEL) is None
    assert (
        check(
            "/v1/audio/transcriptions",
            None,
            "m",
            Capabilities(endpoints=frozenset({"transcription"})),
        )
        is None
    )


# --- the context length ----------------------------------------------------------------------


def _vllm_text_error(chars: int, max_len: int, per_token: int) -> dict[str, Any]:
    """vLLM 0.32's own error body for a text prompt past its bound (renderers/params.py)."""
    bound = max_len * per_token
    return {
        "message": f"This model's maximum context length is {max_len} tokens. However, your "
        f"prompt contains {chars} characters (more than {bound} characters, which is the upper "
        f"bound for {max_len} input tokens). Please reduce the length of the input prompt. "
        f"(parameter=input_text, value={chars})",
        "type": "BadRequestError",
        "param": "input_text",
        "code": 400,
    }


def test_a_prompt_plainly_past_the_context_is_vllms_own_400() -> None:
    bound = 256 * 10
    assert check("/v1/completions", {"prompt": "a" * bound}, "tiny", TEXT_MODEL) is None
    error = check("/v1/completions", {"prompt": "a" * (bound + 1)}, "tiny", TEXT_MODEL)
    assert error is not None and error.status == 400
    assert orjson.loads(error.body()) == {"error": _vllm_text_error(bound + 1, 256, 10)}
    # Each prompt of a batch is judged alone, as vLLM does.
    batch = {"prompt": ["a" * bound, "b" * bound]}
    assert check("/v1/completions", batch, "tiny", TEXT_MODEL) is None


def test_a_chats_message_texts_count_together() -> None:
    half = [{"role": "user", "content": "a" * 1300}, {"role": "assistant", "content": "b" * 1300}]
    error = check(CHAT, {"messages": half}, "tiny", TEXT_MODEL)
    assert error is not None
    assert orjson.loads(error.body()) == {"error": _vllm_text_error(2600, 256, 10)}
    parts = [{"role": "user", "content": [{"type": "text", "text": "a" * 2561}]}]
    assert check(CHAT, {"messages": parts}, "tiny", TEXT_MODEL) is not None


def test_token_ids_past_the_context_are_vllms_token_error() -> None:
    error = check("/v1/completions", {"prompt": list(range(257))}, "tiny", TEXT_MODEL)
    assert error is not None
    assert orjson.loads(error.body())["error"] == {
        "message": "This model's maximum context length is 256 tokens. However, your prompt "
        "contains at least 257 input tokens, which exceeds this limit even without any output "
        "tokens. Please reduce the length of the input prompt. "
        "(parameter=input_tokens, value=257)",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    }
    assert check("/v1/completions", {"prompt": [list(range(256))]}, "tiny", TEXT_MODEL) is None
    # vLLM says "at least" only when its tokenizer stopped at max_model_len + 1.
    many = check("/v1/completions", {"prompt": list(range(600))}, "tiny", TEXT_MODEL)
    assert many is not None and "contains 600 input tokens" in many.message
    assert check("/v1/completions", {"prompt": [list(range(300))]}, "tiny", TEXT_MODEL) is not None


def test_embeddings_past_the_context_and_truncation() -> None:
    embedder = Capabilities(
        endpoints=frozenset({"embeddings"}), max_model_len=8, max_chars_per_token=2
    )
    assert check("/v1/embeddings", {"input": ["x" * 17]}, "e", embedder) is not None
    # With truncate_prompt_tokens the engine cuts the prompt to fit.
    body = {"input": "x" * 1000, "truncate_prompt_tokens": 8}
    assert check("/v1/embeddings", body, "e", embedder) is None


def test_without_the_tokenizer_the_fallback_bound_holds() -> None:
    upstream = Capabilities(max_model_len=100)
    bound = 100 * FALLBACK_CHARS_PER_TOKEN
    assert (
        check(CHAT, {"messages": [{"role": "user", "content": "a" * bound}]}, "u", upstream) is None
    )
    error = check(
        CHAT, {"messages": [{"role": "user", "content": "a" * (bound + 1)}]}, "u", upstream
    )
    assert error is not None and orjson.loads(error.body())["error"]["param"] == "input_text"
    assert (
        check(CHAT, {"messages": [{"role": "user", "content": "a" * 10**6}]}, "u", Capabilities())
        is None
    )


def test_requirement_of_reads_only_what_it_needs() -> None:
    body = {
        "messages": _image(),
        "tools": [{"type": "function"}],
        "response_format": {"type": "json_object"},
    }
    assert requirement_of(CHAT, body) == Requirement(
        CHAT, "chat_completions", frozenset({"image"}), True, "json_object", 5, 0
    )
    assert requirement_of("/v1/rerank", None) == Requirement("/v1/rerank", "rerank")


def test_refusal_takes_the_requirement() -> None:
    needs = requirement_of(CHAT, {"messages": _image()})
    error = refusal("tiny", needs, TEXT_MODEL)
    assert error is not None and error.message == "model 'tiny' does not accept image input"
    assert not needs.met_by(TEXT_MODEL)
    assert needs.met_by(None)


# --- routing --------------------------------------------------------------------------------


def _route(
    name: str,
    endpoints: list[tuple[str, Capabilities | None]],
    model_caps: Capabilities | None = None,
    aliases: tuple[str, ...] = (),
    adapters: tuple[str, ...] = (),
) -> control_pb2.ModelRoute:
    state = control_pb2.MODEL_STATE_READY if endpoints else control_pb2.MODEL_STATE_COLD
    model = control_pb2.Model(
        name=name, engine="vllm", state=state, ready_replicas=len(endpoints),
        live_replicas=len(endpoints), aliases=aliases, lora_adapters=adapters,
    )  # fmt: skip
    if model_caps is not None:
        model.capabilities.CopyFrom(model_caps.to_proto())
    route = control_pb2.ModelRoute(model=model, retry_after_seconds=7)
    for instance_id, caps in endpoints:
        ep = control_pb2.Endpoint(
            instance_id=instance_id, address=f"127.0.0.1:{len(route.endpoints) + 1}"
        )
        if caps is not None:
            ep.capabilities.CopyFrom(caps.to_proto())
        route.endpoints.append(ep)
    return route


VISION = Capabilities(
    endpoints=frozenset({"chat_completions"}), input_modalities=frozenset({"text", "image"})
)
TEXT = Capabilities(endpoints=frozenset({"chat_completions"}), input_modalities=frozenset({"text"}))
WITH_LORA = Capabilities(
    endpoints=frozenset({"chat_completions"}), lora_adapters=(LoraAdapter("sql", "m"),)
)
WITHOUT_LORA = Capabilities(endpoints=frozenset({"chat_completions"}))


async def test_pick_takes_only_instances_that_can_serve_the_request() -> None:
    table = RouteTable()
    table.apply(control_pb2.WatchRoutesResponse(
        version=1, routes=[_route("m", [("text", TEXT), ("vision", VISION)], VISION)]
    ))  # fmt: skip
    text, vision = table.models["m"].targets
    vision.outstanding = 5  # busier: without a requirement the text instance is picked
    assert table.pick("m") is text
    image = requirement_of(CHAT, {"messages": _image()})
    assert table.pick("m", requirement=image) is vision
    assert table.pick("m", avoid=vision, requirement=image) is None
    plain = requirement_of(CHAT, {"messages": HI})
    assert table.pick("m", requirement=plain) is text
    # The model as a whole accepts images (one of its instances does).
    assert refusal("m", image, table.capabilities("m")) is None
    await table.close()


async def test_alike_instances_take_the_fast_path() -> None:
    table = RouteTable()
    table.apply(control_pb2.WatchRoutesResponse(
        version=1, routes=[_route("m", [("a", TEXT), ("b", TEXT)], TEXT)]
    ))  # fmt: skip
    entry = table.models["m"]
    assert entry.uniform
    a, b = entry.targets
    a.outstanding = 1
    assert table.pick("m", requirement=requirement_of(CHAT, {"messages": HI})) is b
    await table.close()


async def test_an_adapter_routes_to_the_instances_that_have_it_loaded() -> None:
    table = RouteTable()
    table.apply(control_pb2.WatchRoutesResponse(version=1, routes=[
        _route("m", [("with", WITH_LORA), ("without", WITHOUT_LORA)], WITH_LORA, adapters=("sql",))
    ]))  # fmt: skip
    with_lora, without = table.models["m"].targets
    with_lora.outstanding = 3
    assert table.pick("m") is without
    assert table.pick("sql") is with_lora
    adapter = table.names["sql"]
    assert (adapter.parent, adapter.state, adapter.info.ready_replicas) == ("m", "ready", 1)
    assert "sql" not in table.models  # the catalog's models stay the catalog's
    await table.close()


async def test_an_adapter_no_ready_instance_has_is_not_ready() -> None:
    table = RouteTable()
    table.apply(control_pb2.WatchRoutesResponse(version=1, routes=[
        _route("m", [("without", WITHOUT_LORA)], WITHOUT_LORA, adapters=("sql",))
    ]))  # fmt: skip
    assert table.pick("sql") is None
    assert table.names["sql"].state == "starting"
    # An instance that has not said what it serves is started with the catalog's adapters.
    table.apply(control_pb2.WatchRoutesResponse(version=2, routes=[
        _route("m", [("unknown", None)], None, adapters=("sql",))
    ]))  # fmt: skip
    picked = table.pick("sql")
    assert picked is not None and picked.instance_id == "unknown"
    await table.close()


async def test_an_adapter_loaded_at_run_time_becomes_a_name() -> None:
    table = RouteTable()
    runtime = Capabilities(lora_adapters=(LoraAdapter("fresh", "m"),))
    table.apply(
        control_pb2.WatchRoutesResponse(version=1, routes=[_route("m", [("a", runtime)], runtime)])
    )
    picked = table.pick("fresh")
    assert picked is not None and picked.instance_id == "a"
    await table.close()


async def test_an_alias_routes_to_its_models_instances() -> None:
    table = RouteTable()
    table.apply(control_pb2.WatchRoutesResponse(version=1, routes=[
        _route("m", [("a", TEXT)], TEXT, aliases=("gpt-4o-mini",)), _route("cold", [], None)
    ]))  # fmt: skip
    picked = table.pick("gpt-4o-mini")
    assert picked is not None and picked is table.pick("m")
    alias = table.names["gpt-4o-mini"]
    assert (alias.alias_of, alias.state, alias.capabilities) == ("m", "ready", TEXT)
    assert table.capabilities("gpt-4o-mini") == TEXT
    assert sorted(table.models) == ["cold", "m"]
    assert table.pick("cold") is None and table.pick("nothing") is None
    await table.close()


# --- /v1/models per key ----------------------------------------------------------------------


def _models_app(table: RouteTable, grant: Grant | None) -> FastAPI:
    app = FastAPI()
    app.include_router(models_router(table))

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return Response(exc.body(), exc.status, media_type="application/json")

    async def with_grant(scope: Any, receive: Any, send: Any) -> None:
        if grant is not None:
            scope[GRANT_SCOPE_KEY] = grant
        await app(scope, receive, send)

    return with_grant  # type: ignore[return-value]


async def _get(table: RouteTable, grant: Grant | None, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=_models_app(table, grant))
    async with httpx.AsyncClient(transport=transport, base_url="http://facade") as client:
        return await client.get(path)


@pytest.fixture
async def table() -> Any:
    caps = Capabilities(
        endpoints=frozenset({"chat_completions"}), input_modalities=frozenset({"text"}),
        tools=False, max_model_len=512, lora_adapters=(LoraAdapter("tiny-sql", "tiny"),),
        engine="vllm", engine_version="0.32.0", runner="generate",
    )  # fmt: skip
    table = RouteTable()
    table.apply(control_pb2.WatchRoutesResponse(version=1, routes=[
        _route("tiny", [("a", caps)], caps, aliases=("gpt-4o-mini",), adapters=("tiny-sql",)),
        _route("other", [], None),
    ]))  # fmt: skip
    yield table
    await table.close()


async def test_models_lists_every_name_with_its_capabilities(table: RouteTable) -> None:
    reply = await _get(table, None, "/v1/models")
    models = {m["id"]: m for m in reply.json()["data"]}
    assert sorted(models) == ["gpt-4o-mini", "other", "tiny", "tiny-sql"]
    tiny = models["tiny"]
    assert (tiny["parent"], tiny["max_model_len"], tiny["aliases"], tiny["state"]) == (
        None,
        512,
        ["gpt-4o-mini"],
        "ready",
    )
    assert tiny["capabilities"] == {
        "endpoints": ["chat_completions"], "input_modalities": ["text"], "tools": False,
        "structured_output": None, "max_model_len": 512, "lora_adapters": ["tiny-sql"],
        "engine": "vllm", "engine_version": "0.32.0", "runner": "generate",
    }  # fmt: skip
    assert (models["tiny-sql"]["parent"], models["tiny-sql"]["state"]) == ("tiny", "ready")
    assert models["gpt-4o-mini"]["alias_of"] == "tiny"
    assert models["other"]["capabilities"] is None and models["other"]["state"] == "cold"


async def test_a_key_sees_only_the_models_it_may_use(table: RouteTable) -> None:
    limited = Grant(owner="alice", models=("tiny*",))
    reply = await _get(table, limited, "/v1/models")
    assert [m["id"] for m in reply.json()["data"]] == ["tiny", "tiny-sql"]
    assert (await _get(table, limited, "/v1/models/tiny-sql")).json()["parent"] == "tiny"
    hidden = await _get(table, limited, "/v1/models/other")
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "model_not_found"
    assert (await _get(table, None, "/v1/models/other")).status_code == 200


def test_a_plain_short_body_skips_the_walk_and_is_judged_the_same() -> None:
    plain = {"model": "m", "messages": HI}
    body = orjson.dumps(plain)
    bare = requirement_for(CHAT, body, plain, TEXT_MODEL)
    assert bare == Requirement(CHAT, "chat_completions")
    assert requirement_for(CHAT, body, plain, TEXT_MODEL) is bare  # made once per path
    # Anything that could matter takes the full walk: the same verdicts as before.
    for request in (
        {"model": "m", "messages": _image()},
        {"model": "m", "messages": HI, "tools": [{"type": "function"}]},
        {"model": "m", "messages": HI, "response_format": {"type": "json_object"}},
        {"model": "m", "messages": [{"role": "user", "content": "x" * 3000}]},
    ):
        raw = orjson.dumps(request)
        assert requirement_for(CHAT, raw, request, TEXT_MODEL) == requirement_of(CHAT, request)
    refused = [
        refusal("m", requirement_for(CHAT, orjson.dumps(r), r, TEXT_MODEL), TEXT_MODEL)
        for r in (
            {"messages": _image()}, {"messages": HI, "tools": [{"type": "function"}]},
            {"messages": [{"role": "user", "content": "x" * 3000}]},
        )
    ]  # fmt: skip
    assert all(error is not None for error in refused)
    # Nothing known of the model: nothing to walk for.
    assert requirement_for(CHAT, orjson.dumps(_image()), None, None).modalities == frozenset()
