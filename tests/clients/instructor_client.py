"""Instructor against the service, run by tests/test_clients_instructor.py in instructor's own venv
(.venv-instructor: see tests/requirements-instructor.txt for why it has one). Prints one JSON line
per mode: its default (TOOLS: a forced call of a function made from the model) and JSON_SCHEMA
(response_format json_schema). Connections other than loopback are refused and fail the run.

    .venv-instructor/bin/python tests/clients/instructor_client.py BASE_URL API_KEY MODEL
"""
from __future__ import annotations

import ipaddress
import json
import socket
import sys

_connect = socket.socket.connect


def _loopback_only(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
        raise SystemExit(f"instructor tried to leave this machine: {address}")
    return _connect(sock, address)


socket.socket.connect = _loopback_only

import instructor  # noqa: E402 - after the guard
from openai import OpenAI  # noqa: E402
from pet import QUESTION, Pet  # noqa: E402 - beside this script


def main(base_url: str, api_key: str, model: str) -> int:
    openai_client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
    for mode in (None, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(openai_client) if mode is None else instructor.from_openai(openai_client,
                                                                                                  mode=mode)
        pet, completion = client.chat.completions.create_with_completion(
            model=model, response_model=Pet, max_tokens=300, max_retries=0,
            messages=[{"role": "user", "content": QUESTION}])
        print(json.dumps({"mode": client.mode.value, "pet": pet.model_dump(),
                          "finish_reason": completion.choices[0].finish_reason}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
