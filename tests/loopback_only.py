"""Client libraries reach for the network on their own (cost maps, tokenizer files, telemetry). Their
tests import `loopback_only`: every connection and name lookup must stay on this machine's loopback;
any other is refused (as with no network) and fails the test at its end."""
from __future__ import annotations

import ipaddress
import socket

import pytest

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def _is_local(host) -> bool:
    if host is None or host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    attempts: list[str] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            attempts.append(f"connect {address}")
            raise OSError(f"test network: {address} is not loopback")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_local(host.decode() if isinstance(host, bytes) else host):
            attempts.append(f"lookup {host}")
            raise socket.gaierror(f"test network: {host} is not loopback")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield
    assert not attempts, f"the client library tried to leave this machine: {attempts}"
