"""`vlkit build` (make build): the profile's image, from docker/, with the pinned build args."""
from __future__ import annotations

import argparse
import collections
import re
import subprocess

from scripts import images
from scripts.planner import options
from scripts.stack import compose as cp
from scripts.stack import docker as dk
from scripts.stack import preflight
from scripts.usage import command, setting

# What a first build fetches, so that minutes of output are expected (docs/DOCKER.md has the numbers).
FIRST_BUILD = {"8gb": "the first build downloads torch with its CUDA libraries (about 3 GB)",
               "16gb": "the first build pulls the vLLM image (about 10 GB)"}


# What docker and pip print when a registry or index does not answer.
OFFLINE = re.compile(r"no such host|dial tcp[^\n]*|TLS handshake timeout|Temporary failure in name resolution|"
                     r"Failed to establish a new connection|Could not resolve host|Network is unreachable", re.I)


def _run_showing(cmd: list[str]) -> tuple[int, str]:
    """Run cmd with its output shown as it comes (docker's build steps are the progress); (exit code,
    the last lines, to explain a failure)."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
    return proc.returncode, "".join(tail)


def build(profiles: list[str]) -> int:
    """Build each profile's image (docker's own output shows the progress); 0 when all were built."""
    opts = dk.BuildOptions.from_env()
    for profile in profiles:
        base = opts.vllm_image if profile == "16gb" else images.image_for(profile)
        if not dk.image_exists(base):
            print(f"building {images.image_for(profile)}: {FIRST_BUILD[profile]}; "
                  "later builds reuse it and take seconds.", flush=True)
        cmd = dk.build_cmd(profile, opts)
        print(f"$ {cp.quote(cmd)}", flush=True)
        code, tail = _run_showing(cmd)
        if code != 0:
            offline = OFFLINE.search(tail)
            preflight.error(f"building the {profile} image failed: " + (
                f"it downloads its base image and torch, and the network does not answer ({offline.group(0)}). "
                f"Connect, then `{command('build', profile=profile)}`." if offline else "docker's output above."))
            return 1
    # The images a rebuild replaced (untagged now), and only vlkit's.
    cp.run(["docker", "image", "prune", "--force", "--filter", f"label={dk.SOURCE_LABEL}"], capture=True)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    if not preflight.docker_ok():
        return 1
    profiles = ["8gb", "16gb"] if args.profile == "all" else [args.profile]
    if args.profile == "auto":
        from scripts.planner import plan_for

        try:
            profiles = [plan_for(**options.plan_kwargs(args)).profile]
        except options.NoGpu as e:
            preflight.error(f"no NVIDIA GPU answers here ({e}) to pick the profile for: name it, "
                            f"`{command('build', profile='8gb')}` (or 16gb), or the card's size, "
                            f"{setting('gpu_memory', '8GiB')}.")
            return 2
        except (ValueError, LookupError) as e:
            preflight.error(f"cannot pick a profile ({e}); name it: `{command('build', profile='8gb')}` (or 16gb).")
            return 2
    return build(profiles)


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="build the profile's image (8gb, 16gb, all, auto)")
    options.add(p, "profile", "model", "context", "gpu_memory", profiles=("8gb", "16gb", "all", "auto"))
    p.set_defaults(func=cmd_build)
