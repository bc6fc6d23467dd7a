"""Images named by OpenAI `image_url` parts: fetched (https://, http://) or
unpacked (data:), checked and decoded, with limits.

Every failure is an ImageError naming the image and why, which the engine
answers with HTTP 400: the client sent something we cannot use. The limits
guard the agent: a size cap read incrementally (never trusting Content-Length
alone), a total timeout per image, an image/* content type, and a pixel cap
checked before decoding (decompression bombs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    """Largest encoded image accepted, fetched or inline."""
    timeout_s: float = 10.0
    """Longest one fetch may take, connection included."""
    max_pixels: int = 50_000_000
    """Largest decoded image (width x height)."""
    max_images: int = 16
    """Most images one request may carry."""


class ImageError(ValueError):
    """An image cannot be used; the message says which and why."""


def describe(url: str) -> str:
    """A short name for an image URL in messages (data: URLs can be megabytes)."""
    limit = 48 if url.startswith("data:") else 200
    return url if len(url) <= limit else url[:limit] + "..."


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageError(f"image {describe(url)}: a data: URL needs a ',' before its data")
    media_type, *params = header.split(";")
    if media_type and not media_type.lower().startswith("image/"):
        raise ImageError(f"image {describe(url)}: media type {media_type!r} is not an image")
    if "base64" not in params:
        raise ImageError(f"image {describe(url)}: only base64 data: URLs are supported")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageError(f"image {describe(url)} is larger than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(urllib.parse.unquote(payload), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image {describe(url)}: invalid base64 data: {exc}") from exc


class ImageFetcher:
    """Fetches and decodes request images; owns one HTTP client session."""

    def __init__(self, limits: ImageLimits | None = None):
        self.limits = limits or ImageLimits()
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.limits.timeout_s),
                headers={"User-Agent": "kscope-agent", "Accept": "image/*"},
            )
        return self._session

    async def load_all(self, urls: list[str]) -> list[Image]:
        """Every image of a request, in order; fetched concurrently."""
        if len(urls) > self.limits.max_images:
            raise ImageError(
                f"{len(urls)} images in one request; at most {self.limits.max_images} are allowed"
            )
        return list(await asyncio.gather(*(self.load(url) for url in urls)))

    async def load(self, url: str) -> Image:
        """One image, decoded to RGB."""
        raw = await self.read(url)
        # Decoding a large image takes tens of milliseconds: not on the event loop.
        return await asyncio.to_thread(self.decode, raw, url)

    async def read(self, url: str) -> bytes:
        """The encoded bytes of one image."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return _data_url_bytes(url, self.limits)
        if scheme not in ("http", "https"):
            raise ImageError(
                f"image {describe(url)}: unsupported URL scheme; use https://, http:// or data:"
            )
        try:
            return await self._fetch(url)
        except TimeoutError as exc:
            raise ImageError(
                f"image {describe(url)}: no answer within {self.limits.timeout_s:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise ImageError(f"image {describe(url)} cannot be fetched: {exc}") from exc

    async def _fetch(self, url: str) -> bytes:
        limit = self.limits.max_bytes
        async with self._client().get(url) as resp:
            if resp.status != 200:
                raise ImageError(f"image {describe(url)} cannot be fetched: HTTP {resp.status}")
            if not resp.content_type.lower().startswith("image/"):
                raise ImageError(
                    f"image {describe(url)}: content type {resp.content_type!r} is not an image"
                )
            if resp.content_length is not None and resp.content_length > limit:
                raise ImageError(f"image {describe(url)} is larger than {limit} bytes")
            parts: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise ImageError(f"image {describe(url)} is larger than {limit} bytes")
                parts.append(chunk)
            return b"".join(parts)

    def decode(self, raw: bytes, url: str) -> Image:
        """Decode to an RGB image, checking the pixel count before decoding."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > self.limits.max_pixels:
                raise ImageError(
                    f"image {describe(url)} has {width}x{height} pixels; "
                    f"at most {self.limits.max_pixels} are allowed"
                )
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageError(f"image {describe(url)} cannot be decoded: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
