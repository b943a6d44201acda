"""Talking to a running vlkit from the host (httpx; no openai dep here): readiness polling,
one-image captions, and the ready-to-paste examples `vlkit up` prints."""
from __future__ import annotations

import base64
import json
import mimetypes
import socket
import textwrap
from pathlib import Path

import httpx

from scripts.usage import command

DEFAULT_PROMPT = "Describe this image in one or two sentences."


class ServiceError(RuntimeError):
    pass


def probe(url: str, timeout: float = 3.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers (or what answers does not speak HTTP)."""
    try:
        return httpx.get(url, timeout=timeout, trust_env=False).status_code
    except httpx.HTTPError:
        return None


def port_free(port: int) -> bool:
    """Can the API bind 127.0.0.1:port? (What Docker will need to publish it.) SO_REUSEADDR, as
    docker-proxy and uvicorn bind: connections of a server just stopped, in TIME_WAIT for a minute,
    do not hold the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_after(port: int) -> int:
    """The first port above `port` that is free (to offer when `port` is taken)."""
    return next((p for p in range(port + 1, min(port + 100, 65536)) if port_free(p)), port + 1)


NOT_THE_API = "a program"  # how what_answers begins when what listens cannot take a caption request


def what_answers(port: int, api_key: str | None = None) -> str | None:
    """What listens on 127.0.0.1:port, in a few words, or None when nothing does: vlkit's service
    (it has /health/ready), another OpenAI-compatible server such as vLLM, or some other program."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return None
    base_url = f"http://127.0.0.1:{port}"
    ready = probe(base_url + "/health/ready", timeout=2)
    if ready is None:
        return f"{NOT_THE_API} that does not answer HTTP"
    try:
        ids = [str(m.get("id")) for m in _request(f"{base_url}/v1/models", api_key=api_key, timeout=3)["data"]]
        listed = f"model {', '.join(ids)}" if ids else "no model listed"
    except (ServiceError, KeyError, TypeError, AttributeError):
        listed = None
    if ready in (200, 503):
        state = "ready" if ready == 200 else "loading the model"
        return f"vlkit's service ({listed}, {state})" if listed else f"vlkit's service ({state})"
    if listed:
        return f"an OpenAI-compatible server ({listed})"
    return f"{NOT_THE_API} that is not vlkit (HTTP {ready} on /health/ready)"


def _request(url: str, payload: dict | None = None, *, api_key: str | None, timeout: float) -> dict:
    """The JSON a GET (or, with a payload, a POST) answers. httpx, not urllib: a server refuses a body
    over its limit (413) before reading it and closes the connection; httpx still reads that answer
    where urllib, writing on, reports only the reset. trust_env=False: a proxy from the environment
    (HTTP_PROXY in a corporate shell) must not carry requests meant for 127.0.0.1."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request("GET" if payload is None else "POST", url, json=payload, headers=headers,
                          timeout=timeout, trust_env=False)
    except httpx.TimeoutException:
        raise ServiceError(f"{url} did not answer within {timeout:g} s (`{command('logs')}` shows what "
                           "the service is doing)") from None
    except httpx.TransportError as e:
        raise ServiceError(f"no vlkit service answers at {url} ({e}). "
                           f"Start it with `{command('up')}` (`{command('status')}` shows what runs).") from None
    if r.is_error:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:500]
        raise ServiceError(f"the service answered {r.status_code}: {message}")
    try:
        return r.json()
    except ValueError:
        raise ServiceError(f"{url} answered HTTP {r.status_code} with something that is not JSON: "
                           f"{r.text[:200]!r}") from None


# The formats' own first bytes: what the file is, whatever its name says (and mimetypes knows .webp
# only where /etc/mime.types exists, which a bare WSL distro may lack).
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
               (b"BM", "image/bmp"))


def _image_type(data: bytes, name: str) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    found = next((mime for magic, mime in _SIGNATURES if data.startswith(magic)), None)
    return found or mimetypes.guess_type(name)[0] or "application/octet-stream"


def image_data_url(path: Path) -> str:
    if path.is_dir():
        raise ServiceError(f"{path} is a folder; give one image file in it")
    if not path.is_file():
        raise ServiceError(f"{path}: no such image file")
    data = path.read_bytes()
    mime = _image_type(data, path.name)
    if not mime.startswith("image/"):
        raise ServiceError(f"{path}: not an image (type {mime}); give a .jpg, .png or .webp file")
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def caption(base_url: str, image: Path, *, prompt: str = DEFAULT_PROMPT, max_tokens: int = 256,
            api_key: str | None = None, timeout: float = 300.0) -> str:
    """Send one image through /v1/chat/completions and return the answer text."""
    data_url = image_data_url(image)
    models = _request(f"{base_url}/v1/models", api_key=api_key, timeout=10)
    try:
        model = models["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise ServiceError(f"{base_url}/v1/models lists no model") from None
    payload = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": prompt},
        ]}],
    }
    out = _request(f"{base_url}/v1/chat/completions", payload, api_key=api_key, timeout=timeout)
    try:
        return out["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise ServiceError(f"unexpected answer: {json.dumps(out)[:300]}") from None


def examples(base_url: str, model: str, *, api_key: bool = False) -> str:
    """The ready-to-paste curl and Python (openai SDK) examples printed once the service is ready.
    With an API key they read it from $VLKIT_API_KEY rather than printing the secret. They bound the
    answer (max_tokens): without it both servers may write up to the rest of the context, as vLLM does."""
    auth = ' -H "Authorization: Bearer $VLKIT_API_KEY"' if api_key else ""
    key = 'os.environ["VLKIT_API_KEY"]' if api_key else '"unused"'
    return textwrap.dedent(f"""\
        curl:
          curl {base_url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{{
            "model": "{model}",
            "messages": [{{"role": "user", "content": [
              {{"type": "image_url", "image_url": {{"url": "data:image/jpeg;base64,'"$(base64 -w0 photo.jpg)"'"}}}},
              {{"type": "text", "text": "Describe this image."}}]}}], "max_tokens": 256}}'

        Python (pip install openai):
          import base64, os, openai
          client = openai.OpenAI(base_url="{base_url}/v1", api_key={key})
          image = base64.b64encode(open("photo.jpg", "rb").read()).decode()
          answer = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": [
              {{"type": "image_url", "image_url": {{"url": f"data:image/jpeg;base64,{{image}}"}}}},
              {{"type": "text", "text": "Describe this image."}}]}}], max_tokens=256)
          print(answer.choices[0].message.content)
        """)
