"""Disk space, the Hugging Face cache and the API port."""
from __future__ import annotations

import os

from scripts.doctor.model import Check, fail, gib, ok, warn
from scripts.stack.client import free_port_after
from scripts.usage import command, setting

GIB = 1024 ** 3
DISK_WARN_BYTES = 30 * GIB  # images (vLLM's alone is ~20 GB unpacked) plus a model or two
DISK_FAIL_BYTES = 5 * GIB


def disk_check(facts) -> Check:
    if not facts.disk_free:
        return warn("disk", "cannot measure free space", None)
    tight = min(facts.disk_free.items(), key=lambda kv: kv[1])
    where = ", ".join(f"{gib(free)} free at {path}" for path, free in facts.disk_free.items())
    if tight[1] < DISK_FAIL_BYTES:
        return fail("disk", where, f"free space at {tight[0]}: `docker system prune`, or remove a model: "
                    f"`{command('clean', model='org/name')}`")
    if tight[1] < DISK_WARN_BYTES:
        return warn("disk", where + f"; images and models want about {gib(DISK_WARN_BYTES)}",
                    "`docker system prune`, or keep the models on a larger disk: "
                    "`export VLKIT_HF_CACHE=/path/on/that/disk` (doctor, download and up all use it)")
    return ok("disk", where)


def model_cache_check(facts) -> Check:
    models = sorted(set(facts.models.values()))
    missing = [m for m in models if not facts.model_cached.get(m)]
    found = f"cache {facts.hf_cache}: " + ", ".join(
        f"{m} {'present' if facts.model_cached.get(m) else 'not downloaded'}" for m in models)
    folders = [m for m in missing if os.path.isdir(m) or os.path.isabs(m) or m.startswith(".")]
    if folders:  # a local path: nothing to download; the model row says what is wrong with it
        why = "no config.json in it" if os.path.isdir(folders[0]) else "no such folder"
        return warn("model-cache", f"{folders[0]} is not a model folder ({why})",
                    "give MODEL= the folder that holds config.json and the weights")
    if missing:
        return warn("model-cache", found, f"`{command('up', model=facts.model_given)}` downloads it first, or now: "
                    f"`{command('download', model=missing[0])}`")
    return ok("model-cache", found)


def port_check(facts) -> Check:
    if facts.port_free:
        return ok("port", f"127.0.0.1:{facts.port} is free")
    holder = facts.port_holder or "a program that does not accept connections"
    return warn("port", f"127.0.0.1:{facts.port} is in use by {holder}",
                f"stop it (`{command('down')}` for vlkit's container; `ss -ltnp 'sport = :{facts.port}'` names "
                f"any program) or use another port: {setting('port', free_port_after(facts.port))}")
