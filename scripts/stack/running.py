"""`vlkit status | down | logs` (make status/down/logs): what runs, and saying so when nothing does.

A service started without Docker (`python -m service`) is not a compose container, but it holds the
port `make up` wants and answers the same API: status names it instead of saying "not running"."""
from __future__ import annotations

import argparse
import os

from scripts.stack import compose as cp
from scripts.stack import docker as dk
from scripts.stack import preflight
from scripts.stack.client import NOT_THE_API, probe, what_answers
from scripts.usage import command


def _port(args: argparse.Namespace) -> int:
    return getattr(args, "port", None) or preflight.default_port()


def _containers() -> list[str]:
    """IDs of vlkit's containers, running or stopped."""
    res = cp.run(cp.compose_cmd(None, "ps", "-a", "-q"), capture=True)
    return res.stdout.split() if res.returncode == 0 else []


def _outside_docker(port: int) -> str | None:
    """What answers on the port without being a vlkit container, as a sentence, or None."""
    what = what_answers(port, os.environ.get("VLKIT_API_KEY"))
    if what is None:
        return None
    return f"127.0.0.1:{port} answers: {what}, not started by `{command('up')}` (no container of it)"


def cmd_status(args: argparse.Namespace) -> int:
    port = _port(args)
    try:
        dk.require_docker()
        docker_problem = None
    except dk.DockerError as e:
        docker_problem = str(e)
    published: set[int] = set()
    containers = []
    if docker_problem is None:
        containers = _containers()
        if containers:
            print(cp.run(cp.compose_cmd(None, "ps", "-a"), capture=True).stdout.rstrip())
        for profile, service in cp.SERVICES.items():
            found = dk.published_port(service)
            if found is None:
                continue
            published.add(found)
            code = probe(f"http://127.0.0.1:{found}{cp.READY_PATHS[profile]}")
            state = {200: "ready", 503: "loading"}.get(code, "not answering" if code is None else f"HTTP {code}")
            print(f"{service}: http://127.0.0.1:{found}/v1  {state}")
    if published and getattr(args, "port", None) in (None, *published):
        return 0  # else: the port asked about is another one; say what answers there too
    other = _outside_docker(port)
    if docker_problem:
        print(f"no vlkit container can run here yet: {docker_problem}")
    if other and f"answers: {NOT_THE_API} " in other:
        print(f"{other}: it holds the port vlkit uses; stop it, or use another port: "
              f"`{command('up', port=port + 1)}`.")
    elif other:
        print(f"{other}: `{command('caption', image='photo.jpg', port=args.port)}` talks to it; "
              "stop it where it was started.")
    elif published:
        print(f"nothing answers on 127.0.0.1:{port}.")
    elif containers:  # created or stopped, published nowhere
        print(f"vlkit's container is not running (listed above): `{command('logs')}` shows why it stopped, "
              f"`{command('up')}` starts it again.")
    elif not docker_problem:
        print(f"vlkit is not running, and nothing answers on 127.0.0.1:{port} (`{command('up')}` starts it).")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if not preflight.docker_ok():
        return 1
    if not _containers():
        other = _outside_docker(_port(args))
        print("nothing to stop: no vlkit container exists" +
              (f"; {other}: stop it where it was started." if other else "."))
        return 0
    res = cp.run(cp.compose_cmd(None, "down", "--remove-orphans"))
    if res.returncode == 0:
        print("vlkit's containers are stopped and removed (the model cache stays).")
    return res.returncode


def cmd_logs(args: argparse.Namespace) -> int:
    if not preflight.docker_ok():
        return 1
    if not _containers():
        other = _outside_docker(_port(args))
        preflight.error("no vlkit container, so no logs" +
                        (f"; {other}: its logs are in the terminal that runs it." if other
                         else f": `{command('up')}` starts one."))
        return 1
    cmd = cp.compose_cmd(None, "logs", "--tail", str(args.tail))
    if not args.no_follow:
        cmd.append("--follow")
    try:
        return cp.run(cmd).returncode
    except KeyboardInterrupt:
        return 0


def register(subparsers) -> None:
    from scripts.planner.options import port

    down = subparsers.add_parser("down", help="stop and remove vlkit's containers (the cache stays)")
    down.set_defaults(func=cmd_down)

    logs = subparsers.add_parser("logs", help="the service's logs (follows; Ctrl-C to stop)")
    logs.add_argument("--tail", type=int, default=200)
    logs.add_argument("--no-follow", action="store_true")
    logs.set_defaults(func=cmd_logs)

    status = subparsers.add_parser("status", help="what runs, where, and whether it is ready")
    status.add_argument("--port", type=port, help="also say what answers on this port (default $VLKIT_PORT, 8000)")
    status.set_defaults(func=cmd_status)
