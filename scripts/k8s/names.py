"""What the user names for `vlkit k8s`, checked before anything is generated.

Kubernetes would refuse a bad name only at `kubectl apply`, after the manifests were written; here
it is an argparse error naming the rule instead.
"""
from __future__ import annotations

import argparse
import re

# A StatefulSet's pods carry the label controller-revision-hash=<name>-<10-char hash>, a label value
# (63 at most), so its name may be 52 long; the Service shares the name and must be a DNS-1035 label.
MAX_NAME = 52
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _fail(kind: str, text: str, rule: str) -> None:
    raise argparse.ArgumentTypeError(f"{kind} {text!r}: {rule}")


def object_name(text: str) -> str:
    """The StatefulSet's and Service's name."""
    if len(text) > MAX_NAME or not _DNS_1035.match(text):
        _fail("name", text, f"lower-case letters, digits and '-', starting with a letter, at most {MAX_NAME} characters")
    return text


def namespace(text: str) -> str:
    if len(text) > 63 or not _DNS_1123_LABEL.match(text):
        _fail("namespace", text, "lower-case letters, digits and '-', at most 63 characters")
    return text


def _subdomain(kind: str, text: str, hint: str = "") -> str:
    if len(text) > 253 or not _DNS_1123_SUBDOMAIN.match(text):
        _fail(kind, text, "lower-case letters, digits, '-' and '.', at most 253 characters" + hint)
    return text


def secret_name(text: str) -> str:
    return _subdomain("secret name", text)


def storage_class(text: str) -> str:
    return _subdomain("storage class", text, " (`kubectl get storageclass` lists them)")


def runtime_class(text: str) -> str:
    return _subdomain("runtime class", text, " (`kubectl get runtimeclass` lists them)")


def _label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_1123_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_NAME.match(name))


def node_label(text: str) -> tuple[str, str]:
    """KEY=VALUE for --node-selector (e.g. nvidia.com/gpu.product=NVIDIA-L4)."""
    key, sep, value = text.partition("=")
    if not sep or not _label_key(key):
        _fail("node label", text, "KEY=VALUE with a label key such as nvidia.com/gpu.product "
              "(`kubectl get nodes --show-labels` lists them)")
    if len(value) > 63 or (value and not _LABEL_NAME.match(value)):
        _fail("node label", text, "the value: letters, digits, '-', '_' and '.', at most 63 characters")
    return key, value


def default_name(model: str) -> str:
    """vlkit-<the model's repo name>, e.g. vlkit-qwen3-vl-4b-instruct-fp8: two models, two names."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-")
    return ("vlkit-" + slug)[:MAX_NAME].rstrip("-") if slug else "vlkit"
