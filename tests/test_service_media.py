"""Image inputs: sources, limits and conversions (service/api/media.py), on real encoded files."""
from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidRequest, PayloadTooLarge
from service.api.media import decode_image, fetch_image_bytes
from service.settings import ServiceSettings
from tests.test_service_api import bomb_png


@pytest.fixture
def settings(tmp_path):
    return ServiceSettings(allowed_media_dir=tmp_path, max_pixels=256 * 256, max_image_bytes=1024 * 1024,
                           max_image_source_pixels=4000 * 4000)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_exif_orientation_is_applied(settings):
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()), settings)
    assert decoded.size == (20, 60)


def test_palette_with_transparency_becomes_rgb_on_white(settings):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    decoded = decode_image(encode(image, "PNG", transparency=0), settings)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)


def test_rgba_and_la_are_composited(settings):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    assert decode_image(encode(rgba, "PNG"), settings).getpixel((1, 1)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert decode_image(encode(la, "PNG"), settings).getpixel((1, 1)) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb(settings):
    decoded = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), settings)
    assert decoded.mode == "RGB"
    r, g, b = decoded.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_not_clipped(settings):
    array = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    decoded = decode_image(encode(Image.fromarray(array), "PNG"), settings)
    assert decoded.mode == "RGB"
    assert abs(decoded.getpixel((0, 0))[0] - 128) <= 1


def test_gif_and_webp_decode(settings):
    frames = [Image.new("P", (10, 10), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(gif.getvalue(), settings).size == (10, 10)
    assert decode_image(encode(Image.new("RGB", (12, 10)), "WEBP"), settings).size == (12, 10)


def test_large_image_is_resized_to_max_pixels_keeping_aspect(settings):
    decoded = decode_image(encode(Image.new("RGB", (1600, 900), (1, 2, 3)), "PNG"), settings)
    assert decoded.width * decoded.height <= settings.max_pixels
    assert abs(decoded.width / decoded.height - 1600 / 900) < 0.02
    jpeg = decode_image(encode(Image.new("RGB", (3200, 1800), (1, 2, 3)), "JPEG"), settings)
    assert jpeg.width * jpeg.height <= settings.max_pixels


def test_decompression_bomb_is_refused_from_the_header(settings):
    with pytest.raises(PayloadTooLarge, match="20000x20000"):
        decode_image(bomb_png(20000, 20000), settings)


def test_not_an_image_and_unsupported_formats(settings):
    with pytest.raises(InvalidRequest, match="not an image"):
        decode_image(b"%PDF-1.7 definitely not a picture", settings)
    with pytest.raises(InvalidRequest, match="not an image"):  # PIL reads it; its rarer decoders stay out
        decode_image(encode(Image.new("RGB", (4, 4)), "PCX"), settings)
    truncated = encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")[:60]
    with pytest.raises(InvalidRequest):
        decode_image(truncated, settings)


def test_data_url_checks(settings):
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    assert fetch_image_bytes("data:image/png;base64," + base64.b64encode(png).decode(), settings) == png
    with pytest.raises(InvalidRequest, match="not an image"):
        fetch_image_bytes("data:application/pdf;base64,AAAA", settings)
    with pytest.raises(InvalidRequest, match="Malformed data URL"):
        fetch_image_bytes("data:image/png,rawbytes", settings)
    with pytest.raises(PayloadTooLarge):
        fetch_image_bytes("data:image/png;base64," + "A" * (2 * 1024 * 1024), settings)


@pytest.mark.parametrize("mime", ["application/octet-stream", "binary/octet-stream", "APPLICATION/OCTET-STREAM"])
def test_a_data_url_of_unknown_binary_type_is_read_for_what_it_holds(settings, mime):
    """What a browser's FileReader or mimetypes.guess_type's fallback labels a file it cannot place:
    vLLM decodes the bytes whatever the label; here too, within the formats decode_image takes."""
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    assert fetch_image_bytes(f"data:{mime};base64," + base64.b64encode(png).decode(), settings) == png


def test_local_files_only_under_the_allowed_dir(settings, tmp_path):
    inside = tmp_path / "ok.png"
    inside.write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    assert fetch_image_bytes(f"file://{inside}", settings) == inside.read_bytes()
    assert fetch_image_bytes("ok.png", settings) == inside.read_bytes()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(inside.read_bytes())
    link = tmp_path / "link.png"
    os.symlink(outside, link)
    for url in (f"file://{outside}", str(outside), "../" + outside.name, f"file://{link}"):
        with pytest.raises(InvalidRequest, match="outside the allowed"):
            fetch_image_bytes(url, settings)
    with pytest.raises(InvalidRequest, match="does not exist"):
        fetch_image_bytes(str(tmp_path / "missing.png"), settings)
    closed = settings.model_copy(update={"allowed_media_dir": None})
    with pytest.raises(InvalidRequest, match="disabled"):
        fetch_image_bytes(str(inside), closed)


def test_remote_urls_are_refused_unless_enabled(settings):
    with pytest.raises(InvalidRequest, match="Remote image URLs are disabled"):
        fetch_image_bytes("http://127.0.0.1:9/cat.png", settings)
    with pytest.raises(InvalidRequest, match="scheme"):
        fetch_image_bytes("ftp://example.com/cat.png", settings)


def test_remote_urls_when_enabled_are_fetched_with_the_byte_limit(settings, tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "small.png").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    (tmp_path / "big.bin").write_bytes(b"\0" * (settings.max_image_bytes + 10))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        remote = settings.model_copy(update={"allow_remote_urls": True})
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert fetch_image_bytes(f"{base}/small.png", remote) == (tmp_path / "small.png").read_bytes()
        with pytest.raises(PayloadTooLarge):
            fetch_image_bytes(f"{base}/big.bin", remote)
        with pytest.raises(InvalidRequest, match="Cannot fetch"):
            fetch_image_bytes(f"{base}/missing.png", remote)
    finally:
        httpd.shutdown()
