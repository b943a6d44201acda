"""Image inputs: fetch the bytes (data: URL, allowed local file, optional http(s)) and decode safely;
`ImageLoader` does both for a request's images off the event loop.

Checks come before work: encoded size before base64 decoding, pixel count from the header before
decoding pixels (decompression bombs: a 20000x20000 PNG is refused after reading ~30 bytes), then
EXIF orientation, conversion to 8-bit RGB (palette, alpha, CMYK, 16-bit), and a resize so the image
has at most `max_pixels` (aspect kept; the processor then rounds to its patch grid itself).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import re
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pybase64
from PIL import Image, ImageOps

from service.api.offload import off_loop
from service.errors import InvalidRequest, PayloadTooLarge
from service.settings import ServiceSettings

# What cameras, browsers and screenshot tools write. vLLM opens whatever PIL reads; PIL's rarer
# decoders (FLI, PCX, ...) are where its security fixes have been, so they stay out.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Images decoded at once, over all requests: a decode can take ~1 GB at max_image_source_pixels, and
# it runs before the queue limit applies, so a burst of large images must not decode all at once.
CONCURRENT_DECODES = 4
# The pixel guard is ours (`max_image_source_pixels`, checked from the header before decoding), so
# PIL's fixed process-wide one would only make the limit and the message inconsistent.
Image.MAX_IMAGE_PIXELS = None
# Labels for "some bytes" (a browser's FileReader on a Blob without a type, mimetypes' fallback): the
# bytes decide, as in vLLM, which reads data URLs whatever their label; decode_image still checks them.
UNKNOWN_BINARY = ("application/octet-stream", "binary/octet-stream")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


class ImageLoader:
    """A request's images, fetched and decoded in worker threads (at most CONCURRENT_DECODES decodes
    at once over all requests), in the order of their URLs."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self._decode_slots = asyncio.Semaphore(CONCURRENT_DECODES)

    async def load(self, urls: list[str]) -> list[Image.Image]:
        return list(await asyncio.gather(*(self._load_one(url) for url in urls)))

    async def _load_one(self, url: str) -> Image.Image:
        data = await off_loop(fetch_image_bytes, url, self.settings)
        async with self._decode_slots:
            return await off_loop(decode_image, data, self.settings)


def fetch_image_bytes(url: str, settings: ServiceSettings) -> bytes:
    """The encoded bytes behind an image_url (blocking: run it in a worker thread)."""
    url = url.strip()
    if url[:5].lower() == "data:":
        return _from_data_url(url, settings)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not settings.allow_remote_urls:
            raise InvalidRequest(
                "Remote image URLs are disabled on this server; send the image as a data: URL "
                "(base64), or start the service with VLKIT_ALLOW_REMOTE_URLS=true.", param="image_url", kind="remote_url")
        return _from_remote(url, settings)
    if scheme in ("file", ""):
        return _from_local_file(unquote(urlparse(url).path) if scheme == "file" else url, settings)
    raise InvalidRequest(f"Unsupported image URL scheme {scheme!r}: use data:, file:// or http(s)://",
                         param="image_url", kind="bad_image")


def _from_data_url(url: str, settings: ServiceSettings) -> bytes:
    match = _DATA_URL.match(url[:512])
    if not match or not match.group("b64"):
        raise InvalidRequest("Malformed data URL: expected data:image/<type>;base64,<data>", param="image_url",
                             kind="bad_image")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/") and mime not in UNKNOWN_BINARY:
        raise InvalidRequest(f"The data URL holds {mime!r}, not an image", param="image_url", kind="bad_image")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise PayloadTooLarge(f"Image is over {settings.max_image_bytes} bytes (encoded)", param="image_url")
    try:
        # pybase64 (SIMD): ~1 ms for a 3.6 MB payload where the standard library holds the GIL ~10 ms,
        # stalling the engine's scheduler thread and the event loop.
        return pybase64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        pass
    try:  # what it refuses, the standard library may still read (e.g. data after the padding)
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise InvalidRequest("The data URL's base64 payload does not decode", param="image_url",
                             kind="bad_image") from None


def _from_local_file(path_text: str, settings: ServiceSettings) -> bytes:
    if settings.allowed_media_dir is None:
        raise InvalidRequest("Local image files are disabled on this server (no allowed media directory is set; "
                             "VLKIT_ALLOWED_MEDIA_DIR)", param="image_url", kind="local_file")
    root = Path(settings.allowed_media_dir).expanduser().resolve()
    try:  # a path the OS refuses (a NUL byte, a name too long, ~user unknown, unreadable) is the request's
        path = Path(path_text).expanduser()
        path = (path if path.is_absolute() else root / path).resolve()  # resolve() follows symlinks out, too
        if not path.is_relative_to(root):
            raise InvalidRequest(f"Image file {path_text!r} is outside the allowed media directory",
                                 param="image_url", kind="local_file")
        if not path.is_file():
            raise InvalidRequest(f"Image file {path_text!r} does not exist", param="image_url", kind="local_file")
        if path.stat().st_size > settings.max_image_bytes:
            raise PayloadTooLarge(f"Image is over {settings.max_image_bytes} bytes", param="image_url")
        return path.read_bytes()
    except (OSError, ValueError, RuntimeError) as exc:
        reason = getattr(exc, "strerror", None) or exc  # an OSError's own text repeats the whole path
        raise InvalidRequest(f"Image file {path_text[:200]!r} cannot be read: {reason}", param="image_url",
                             kind="local_file") from None


def _from_remote(url: str, settings: ServiceSettings) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=True) as response:
            response.raise_for_status()
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > settings.max_image_bytes:
                    raise PayloadTooLarge(f"Image is over {settings.max_image_bytes} bytes", param="image_url")
            return bytes(data)
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"Cannot fetch the image URL: {exc}", param="image_url", kind="bad_image") from None


def decode_image(data: bytes, settings: ServiceSettings) -> Image.Image:
    """Validated, upright, 8-bit RGB, at most `max_pixels`."""
    if len(data) > settings.max_image_bytes:
        raise PayloadTooLarge(f"Image is over {settings.max_image_bytes} bytes", param="image_url")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Exception:  # noqa: BLE001 - UnidentifiedImageError, or a header PIL chokes on
        raise InvalidRequest(f"The data is not an image in a supported format ({', '.join(FORMATS)})",
                             param="image_url", kind="bad_image") from None
    width, height = image.size
    if width * height > settings.max_image_source_pixels:
        raise PayloadTooLarge(
            f"Image is {width}x{height} = {width * height} pixels; the limit is {settings.max_image_source_pixels}",
            param="image_url")
    try:
        if image.format == "JPEG" and width * height > settings.max_pixels:
            image.draft("RGB", _fit(width, height, settings.max_pixels))  # decode at a smaller scale: cheaper
        image.load()
        image = upright(image)
        image = to_rgb(image)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder makes of these bytes is this request's 400
        raise InvalidRequest(f"The image cannot be decoded: {type(exc).__name__}: {exc}", param="image_url",
                             kind="bad_image") from None
    if image.width * image.height > settings.max_pixels:
        image = image.resize(_fit(image.width, image.height, settings.max_pixels), Image.Resampling.BICUBIC)
    return image


def upright(image: Image.Image) -> Image.Image:
    """Turned as its EXIF orientation says; as it is when the EXIF data is corrupt (it is metadata:
    the pixels are fine, as a browser shows them)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns of corrupt EXIF before it raises
            return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - OverflowError, struct.error, ... from a broken EXIF block
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited on white; 16-bit scaled (not clipped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)  # exact for 16-bit values, half float64's memory
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))
