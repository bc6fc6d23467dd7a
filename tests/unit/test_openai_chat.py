"""Pure pieces of the mlx_vlm engine: OpenAI chat requests checked and translated
(node_agent/engines/openai_chat.py), stop strings, and inline images
(node_agent/images.py)."""

from __future__ import annotations

import base64
import io
from typing import Any

import orjson
import pytest

from node_agent.engines.base import EngineError
from node_agent.engines.openai_chat import (
    DEFAULT_MAX_TOKENS,
    ChatRenderer,
    StopMatcher,
    parse_chat_request,
)
from node_agent.images import ImageError, ImageFetcher, ImageLimits

USER = {"role": "user", "content": "hi"}


def _parse(**fields: Any) -> Any:
    return parse_chat_request(orjson.dumps({"messages": [USER], **fields}), "served")


def test_defaults_and_sampling_translation() -> None:
    request = _parse(temperature=0, top_p=0.5, top_k=-1, seed=7, logit_bias={"5": -100})
    assert request.model == "served"
    assert request.max_tokens == DEFAULT_MAX_TOKENS
    assert request.seed == 7
    assert request.sampling == {
        "temperature": 0.0, "top_p": 0.5, "top_k": 0, "logit_bias": {5: -100.0},
        "skip_special_tokens": True,
    }  # fmt: skip
    assert _parse(model="asked", max_completion_tokens=3, max_tokens=9).max_tokens == 3
    assert _parse(stop="x").stop == ["x"]
    assert _parse(stream_options={"include_usage": True}).include_usage


def test_images_text_and_roles_in_order() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": "https://a/1.png"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ]},
            {"role": "assistant", "content": None},
            {"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]},
        ]
    }  # fmt: skip
    request = parse_chat_request(orjson.dumps(body), "m")
    assert request.image_urls == ["https://a/1.png", "data:image/png;base64,AA=="]
    assert request.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "compare"}, {"type": "image"}, {"type": "image"},
        ]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "a\nb"},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"seed": "7"}, "seed"),
        ({"stream_options": {"continuous_usage_stats": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": "https://a"}}]}]},
         "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_400_naming_it(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(EngineError) as info:
        _parse(**fields)
    assert info.value.http_status == 400
    error = orjson.loads(info.value.openai_error())
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_null_fields_and_openai_defaults_are_accepted() -> None:
    request = _parse(n=1, logprobs=False, tools=None, tool_choice="none", user="u",
                     response_format={"type": "text"}, presence_penalty=None)  # fmt: skip
    assert request.sampling == {"skip_special_tokens": True}


def test_stop_matcher_holds_back_only_possible_starts() -> None:
    matcher = StopMatcher(["END", "xyz"])
    assert matcher.push("hello E") == ("hello ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("D and more") == ("", True)
    matcher = StopMatcher(["END"])
    assert matcher.push("ab EN") == ("ab ", False)
    assert matcher.push("Z") == ("ENZ", False)
    assert matcher.push("E") == ("", False)
    assert matcher.flush() == "E"
    assert StopMatcher([]).push("anything") == ("anything", False)


def test_renderer_shapes_openai_objects() -> None:
    from node_agent.engines.base import Usage

    renderer = ChatRenderer("m", include_usage=True)
    first = orjson.loads(renderer.delta({"role": "assistant", "content": ""}))
    assert first["object"] == "chat.completion.chunk"
    assert first["id"].startswith("chatcmpl-") and first["usage"] is None
    last = orjson.loads(renderer.usage_chunk(Usage(3, 2, 5)))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5
    body = orjson.loads(renderer.completion("hey", "length", Usage(3, 2, 5)))
    assert body["object"] == "chat.completion" and body["id"] == first["id"]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hey"}


def _png(size: tuple[int, int] = (8, 8)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, "PNG")
    return out.getvalue()


async def test_data_urls_decode_and_bad_ones_are_image_errors() -> None:
    fetcher = ImageFetcher(ImageLimits(max_bytes=10_000, max_pixels=100))
    good = "data:image/png;base64," + base64.b64encode(_png()).decode()
    image = await fetcher.load(good)
    assert image.size == (8, 8) and image.mode == "RGB"
    bad = {
        "data:image/png;base64,not base64!": "invalid base64",
        "data:text/plain;base64,aGk=": "not an image",
        "data:image/png,raw": "only base64",
        "data:image/png;base64," + base64.b64encode(b"not a png").decode(): "cannot be decoded",
        "data:image/png;base64," + base64.b64encode(_png((20, 20))).decode(): "pixels",
        "data:image/png;base64," + "A" * 20_000: "larger than",
        "ftp://host/x.png": "unsupported URL scheme",
    }
    for url, why in bad.items():
        with pytest.raises(ImageError, match=why):
            await fetcher.load(url)
    with pytest.raises(ImageError, match="at most"):
        await fetcher.load_all([good] * 17)
    await fetcher.close()
