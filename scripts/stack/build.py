"""`vlkit build` (make build): the profile's image, from docker/, with the pinned build args."""
from __future__ import annotations

import argparse

from scripts import images
from scripts.planner import options
from scripts.stack import compose as cp
from scripts.stack import docker as dk
from scripts.stack import preflight
from scripts.usage import command, setting

# What a first build fetches, so that minutes of output are expected (docs/DOCKER.md has the numbers).
FIRST_BUILD = {"8gb": "the first build downloads torch with its CUDA libraries (about 3 GB)",
               "16gb": "the first build pulls the vLLM image (about 10 GB)"}


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
        if cp.run(cmd).returncode != 0:
            preflight.error(f"building the {profile} image failed (docker's output above).")
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
