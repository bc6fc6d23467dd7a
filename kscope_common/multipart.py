"""multipart/form-data, as far as the gateway reads it: the boundary, and where
each part's value lies. One reader for the facade (which routes by the `model`
field) and the agent (which renames it for an upstream), so the two never
disagree on what the field is. File parts are found, never copied."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

FORM_DATA = b"multipart/form-data"


class NotMultipart(ValueError):
    """The body is not multipart/form-data with the boundary given."""


class Part(NamedTuple):
    name: bytes | None
    """The field's name; None for a file part."""
    start: int
    """Where its value begins in the body."""
    end: int
    """Where its value ends (the CRLF before the next delimiter)."""


def boundary_of(content_type: bytes) -> bytes | None:
    """The boundary of a multipart/form-data Content-Type, or None."""
    media, _, params = content_type.partition(b";")
    if media.strip().lower() != FORM_DATA:
        return None
    for param in params.split(b";"):
        name, _, value = param.strip().partition(b"=")
        if name.strip().lower() == b"boundary":
            value = value.strip().strip(b'"')
            return value or None
    return None


def parts(body: bytes, boundary: bytes) -> Iterator[Part]:
    """Every part of `body`, in order; NotMultipart when it is not one."""
    delimiter = b"\r\n--" + boundary
    at = body.find(b"--" + boundary)
    if at < 0 or body[:at].strip():
        raise NotMultipart
    while True:
        headers_at = at + 2 + len(boundary)
        if body.startswith(b"--", headers_at):
            return  # the closing delimiter
        headers_end = body.find(b"\r\n\r\n", headers_at)
        if headers_end < 0:
            raise NotMultipart
        end = body.find(delimiter, headers_end)
        if end < 0:
            raise NotMultipart
        yield Part(_field_name(body[headers_at:headers_end]), headers_end + 4, end)
        at = end + 2


def _field_name(headers: bytes) -> bytes | None:
    """The `name` of a text part's Content-Disposition (None for a file part)."""
    for line in headers.split(b"\r\n"):
        header, _, value = line.partition(b":")
        if header.strip().lower() != b"content-disposition":
            continue
        name = None
        for param in value.split(b";")[1:]:
            key, _, raw = param.strip().partition(b"=")
            key = key.strip().lower()
            if key.startswith(b"filename"):  # filename, filename*
                return None
            if key == b"name":
                name = raw.strip().strip(b'"')
        return name
    return None
