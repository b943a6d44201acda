"""Data URLs are base64-decoded by pybase64 (fast, so the GIL is not held for long): the result and
the errors must be those of the standard library's base64.b64decode(payload, validate=False), whatever
the payload holds."""
from __future__ import annotations

import base64
import binascii
import random

import pytest

from service.api import media
from service.errors import InvalidRequest
from service.settings import ServiceSettings

SETTINGS = ServiceSettings(max_image_bytes=1024 * 1024)


def one_decode(payload: str):
    """What the standard library makes of this payload: the bytes, or InvalidRequest."""
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        return InvalidRequest


def ours(payload: str):
    try:
        return media._from_data_url("data:image/png;base64," + payload, SETTINGS)
    except InvalidRequest:
        return InvalidRequest


def payloads() -> list[str]:
    rng = random.Random(0)
    out = []
    for n in (0, 1, 2, 3, 47, 48, 49, 96, 200, 301):
        data = rng.randbytes(n)
        text = base64.b64encode(data).decode()
        out.append(text)
        if n < 47:
            continue
        out.append(base64.encodebytes(data).decode())                # \n every 76 characters
        out.append(text[:10] + " " + text[10:])                     # one stray space: the quads shift
        out.append(text[:8] + "    " + text[8:])                    # four: the quads line up again
        out.append(text[:16] + "==" + text[16:])                    # padding before the end
        out.append(text[:16] + "=" + text[16:])                     # a lone pad character
        out.append(text[:-1])                                       # truncated
        out.append(text[:-2] + "\u00e9" + text[-1:])                # not ASCII
        out.append(text + "!!")                                     # characters outside the alphabet
        out.append(text.replace("+", "-").replace("/", "_"))        # the URL-safe alphabet
        out.append(text + "==QUJD")                                 # data after the padding
    return out


def test_data_urls_decode_as_the_standard_library_does():
    for payload in payloads():
        assert ours(payload) == one_decode(payload), repr(payload)


def test_a_large_payload_decodes_whole():
    data = random.Random(1).randbytes(300_003)
    assert ours(base64.b64encode(data).decode()) == data
    assert ours(base64.encodebytes(data).decode()) == data  # with line breaks every 76 characters
