"""`vlkit up | down | logs | status | build | download | caption | clean | bench` (the make targets).

`vlkit up` is the user's first command: health gate and plan first, then build if needed, start
through docker compose, wait for readiness with a progress indicator, and print how to call it. When
something fails it shows the container's last log lines and what they mean.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts import images
from scripts.planner.sizes import memory_arg
from scripts.stack import compose as cp
from scripts.stack import docker as dk
from scripts.stack.client import ServiceError, caption, examples, probe
from scripts.stack.diagnose import diagnose
from wsl.host import detect_platform

GIB = 1024 ** 3
CPU_PLAN_MEMORY = 8 * GIB   # CPU mode plans as for an 8 GB card (the profile it tests)


# --- helpers ---------------------------------------------------------------------------------------
def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _err(msg: str) -> None:
    print(f"vlkit: {msg}", file=sys.stderr)


def default_model() -> str:
    from service.settings import ServiceSettings

    return ServiceSettings.model_fields["model"].default


def _plan(args: argparse.Namespace):
    from scripts.planner import plan_for

    kwargs = dict(model=args.model, profile=args.profile, context=args.context,
                  gpu_memory_bytes=args.gpu_memory, gpu_memory_utilization=args.gpu_memory_utilization)
    if args.cpu:
        kwargs.update(profile="8gb", gpu_memory_bytes=args.gpu_memory or CPU_PLAN_MEMORY)
    return plan_for(**kwargs)


def _launch(args: argparse.Namespace, plan) -> cp.Launch:
    return cp.Launch(profile=plan.profile, model=args.model, port=args.port,
                     service_env={k: str(v) for k, v in (plan.service_env or {}).items()},
                     vllm_args=[str(a) for a in (plan.vllm_args or [])], cpu=args.cpu,
                     vllm_env=images.vllm_env(detect_platform().kind) if plan.profile == "16gb" else {},
                     hf_cache=cp.hf_hub_cache(), api_key=os.environ.get("VLKIT_API_KEY") or None)


def _show_plan_refusal(plan) -> None:
    _err(f"the plan for {plan.model} does not fit this card ({plan.profile} profile).")
    if plan.refusal:
        print(f"  next step: {plan.refusal}", file=sys.stderr)
    print("  `make plan` shows the whole budget.", file=sys.stderr)


def _gate(plan) -> bool:
    from wsl.health import gate

    result = gate(plan.required_free_bytes)
    if result.ok:
        return True
    _err("the GPU health check failed, nothing was started:")
    for reason in result.reasons:
        print(f"  - {reason}", file=sys.stderr)
    for fix in result.fixes:
        print(f"  fix: {fix}", file=sys.stderr)
    return False


def _docker_ok(extra: str = "") -> bool:
    """require_docker(), reported as one line (with `extra` appended) instead of a traceback."""
    try:
        dk.require_docker()
    except dk.DockerError as e:
        _err(f"{e}{extra}")
        return False
    return True


def _env_header(launch: cp.Launch, plan) -> str:
    return (f"Written by `vlkit up` from the plan ({launch.profile} profile, {launch.model}); "
            "regenerated on every start.\nEdit the plan's inputs (`make up MODEL=... CONTEXT=...`), not this file.")


def _print_failure(launch: cp.Launch, text: str, cid: str | None) -> None:
    con = _console()
    logs = dk.logs_tail(cid, 40) if cid else ""
    if logs.strip():
        con.print(f"[bold]last log lines of {launch.service}:[/bold]")
        print(logs.rstrip(), flush=True)  # unwrapped, as the container wrote them
    found = diagnose(text + "\n" + logs)
    for d in found:
        con.print(f"[bold red]cause:[/bold red] {d.cause}", markup=True)
        con.print(f"[bold green]fix:[/bold green] {d.fix}", markup=True)
    if not found:
        con.print("Not a known cause. Full logs: `make logs`; checks: `make doctor`.")


def wait_ready(launch: cp.Launch, timeout: float, poll: float = 1.0) -> tuple[bool, str]:
    """Poll the readiness URL while watching the container; (ready, what went wrong)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=False) as progress:
        task = progress.add_task(f"starting {launch.service} ({launch.model})", total=None)
        while time.monotonic() < deadline:
            status = probe(launch.ready_url, timeout=2)
            if status == 200:
                progress.update(task, description=f"{launch.service} is ready")
                return True, ""
            cid = dk.container_id(launch.service)
            state = dk.container_state(cid) if cid else None
            if state is None:
                return False, "the container is gone"
            if state.status in ("exited", "dead") or state.restarts > 0 or state.status == "restarting":
                return False, f"the container stopped (exit code {state.exit_code}) {state.error}"
            if state.health == "unhealthy":
                return False, "the container's health check failed"
            phase = "loading the model" if status == 503 else "starting the server"
            last = dk.logs_tail(cid, 1).strip().splitlines()
            detail = f": {last[-1][:90]}" if last else ""
            progress.update(task, description=f"{launch.service}: {phase}{detail}")
            time.sleep(poll)
    return False, f"not ready after {timeout:.0f} s"


# --- commands --------------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    args.model = args.model or default_model()
    if args.cpu and args.profile == "16gb":
        _err("--cpu runs the 8gb service without a GPU; vLLM (16gb) needs a GPU.")
        return 2
    try:
        plan = _plan(args)
    except (ValueError, FileNotFoundError, LookupError) as e:
        _err(f"cannot plan for {args.model}: {e}")
        print("  `make doctor` checks the driver, the GPU and Docker.", file=sys.stderr)
        return 2
    if not plan.fits:
        _show_plan_refusal(plan)
        return 2
    launch = _launch(args, plan)
    if args.dry_run:
        return _print_dry_run(args, launch)
    if not args.cpu and not args.skip_gate and not _gate(plan):
        return 3
    if not _docker_ok():
        return 1
    if not launch.local_model_dir and not args.no_download:
        from scripts.stack.download import DownloadError, download

        try:
            download(launch.model)
        except DownloadError as e:
            _err(str(e))
            return 1
    why = dk.needs_build(launch.profile)
    if why and args.no_build:
        _err(f"{why}; run `make build` (or drop --no-build).")
        return 1
    if why:
        print(f"building: {why}")
        code = cmd_build(argparse.Namespace(profile=launch.profile, model=args.model))
        if code:
            return code
    env = launch.interpolation_env()
    cp.write_atomic(cp.ENV_FILE, cp.render_env_file(launch.env_file_values(), _env_header(launch, plan)))
    cp.write_atomic(cp.OVERRIDE_FILE, launch.override_text())
    Path(env["VLKIT_HF_CACHE"]).mkdir(parents=True, exist_ok=True)  # bind source: the host's hub cache
    cp.run(cp.compose_cmd(None, "rm", "--stop", "--force", *launch.other_services()), env=env, capture=True)
    res = cp.run(launch.compose_up(), env=env, capture=True)
    if res.returncode != 0:
        _err("docker compose could not start the service:")
        print((res.stderr or res.stdout).strip(), file=sys.stderr)
        _print_failure(launch, res.stderr + res.stdout, dk.container_id(launch.service))
        return 1
    ok, why = wait_ready(launch, args.timeout)
    if not ok:
        cid = dk.container_id(launch.service)
        _err(f"{launch.service} did not become ready: {why}")
        _print_failure(launch, why, cid)
        cp.run(cp.compose_cmd(launch.profile, "stop", launch.service), env=env, capture=True)
        print(f"stopped {launch.service}; `make logs` shows everything, `make down` removes it.", file=sys.stderr)
        return 1
    con = _console()
    con.print(f"\n[bold green]vlkit is up[/bold green]: {launch.url}/v1  (model: {launch.served_model_name}, "
              f"{launch.profile} profile{', CPU mode' if launch.cpu else ''})")
    # Plain print: rich would wrap the long lines to the terminal and break copy-paste.
    print(examples(launch.url, launch.served_model_name, api_key=bool(launch.api_key)))
    print("Next: `make caption IMG=photo.jpg`, `make status`, `make logs`, `make down`.")
    return 0


def _print_dry_run(args: argparse.Namespace, launch: cp.Launch) -> int:
    compose = launch.compose_up()
    env_values = launch.env_file_values()
    if args.json:
        print(json.dumps({"profile": launch.profile, "model": launch.model, "compose": compose,
                          "container_command": launch.container_command(), "env_file": env_values,
                          "override": launch.override(), "interpolation": launch.interpolation_env(),
                          "url": launch.url}, indent=2, default=str))
        return 0
    print(f"profile: {launch.profile}   model: {launch.model}   url: {launch.url}/v1")
    print(f"compose: {cp.quote(compose)}")
    print(f"container command: {cp.quote(launch.container_command())}")
    if env_values:
        print(f"env file {cp.ENV_FILE}:")
        for k in sorted(env_values):
            print(f"  {k}={env_values[k]}")
    print(f"override {cp.OVERRIDE_FILE}:")
    print("  " + launch.override_text().rstrip().replace("\n", "\n  "))
    print("(dry run: nothing was built, written or started)")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    if not _docker_ok():
        return 1
    profiles = ["8gb", "16gb"] if args.profile == "all" else [args.profile]
    if args.profile == "auto":
        ns = argparse.Namespace(model=getattr(args, "model", None) or default_model(), profile="auto",
                                context=None, gpu_memory=None, gpu_memory_utilization=None, cpu=False)
        try:
            profiles = [_plan(ns).profile]
        except Exception as e:  # planning needs a GPU or --profile; say which
            _err(f"cannot pick a profile ({e}); use PROFILE=8gb or PROFILE=16gb")
            return 2
    opts = dk.BuildOptions.from_env()
    for profile in profiles:
        if profile == "16gb" and not dk.image_exists(opts.vllm_image):
            print(f"pulling {opts.vllm_image} (about 10 GB, once)...", flush=True)
        cmd = dk.build_cmd(profile, opts)
        print(f"$ {cp.quote(cmd)}", flush=True)
        if cp.run(cmd).returncode != 0:
            _err(f"building the {profile} image failed (output above).")
            return 1
    # The images a rebuild replaced (untagged now), and only vlkit's.
    cp.run(["docker", "image", "prune", "--force", "--filter", f"label={dk.SOURCE_LABEL}"], capture=True)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if not _docker_ok():
        return 1
    return cp.run(cp.compose_cmd(None, "down", "--remove-orphans")).returncode


def cmd_logs(args: argparse.Namespace) -> int:
    if not _docker_ok():
        return 1
    cmd = cp.compose_cmd(None, "logs", "--tail", str(args.tail))
    if not args.no_follow:
        cmd.append("--follow")
    try:
        return cp.run(cmd).returncode
    except KeyboardInterrupt:
        return 0


def cmd_status(args: argparse.Namespace) -> int:
    if not _docker_ok():
        return 1
    res = cp.run(cp.compose_cmd(None, "ps", "-a"), capture=True)
    if res.returncode != 0:
        _err((res.stderr or res.stdout).strip())
        return 1
    print(res.stdout.rstrip())
    running = False
    for profile, service in cp.SERVICES.items():
        port = dk.published_port(service)
        if port is None:
            continue
        running = True
        code = probe(f"http://127.0.0.1:{port}{cp.READY_PATHS[profile]}")
        state = {200: "ready", 503: "loading"}.get(code, "not answering" if code is None else f"HTTP {code}")
        print(f"{service}: http://127.0.0.1:{port}/v1  {state}")
    if not running:
        print("vlkit is not running (`make up` starts it).")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from scripts.stack.download import DownloadError, download

    try:
        path = download(args.model)
    except DownloadError as e:
        _err(str(e))
        return 1
    print(f"{args.model} is in the shared cache: {path}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    port = args.port
    if shutil.which("docker"):  # the running service's port; without Docker, the default one
        for service in cp.SERVICES.values():
            port = port or dk.published_port(service)
    port = port or cp.DEFAULT_PORT
    try:
        print(caption(f"http://127.0.0.1:{port}", Path(args.image), prompt=args.prompt,
                      api_key=os.environ.get("VLKIT_API_KEY")))
    except ServiceError as e:
        _err(str(e))
        return 1
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    if not _docker_ok():
        return 1
    cp.run(cp.compose_cmd(None, "down", "--remove-orphans"))
    for tag in (images.SERVICE_IMAGE, images.VLLM_SERVICE_IMAGE):
        if dk.image_exists(tag):
            cp.run(["docker", "image", "rm", tag])
    for path in (cp.ENV_FILE, cp.OVERRIDE_FILE):
        path.unlink(missing_ok=True)
    if args.model:
        from scripts.stack.download import remove_from_cache

        freed = remove_from_cache(args.model)
        print(f"removed {args.model} from the cache ({freed / GIB:.2f} GiB)")
    else:
        print(f"kept the model cache ({cp.hf_hub_cache()}); `make clean MODEL=<id>` removes a model.")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark needs torch and a GPU: run it here when this Python has torch (a service venv),
    else inside the 8gb image on the GPU (built first if it is missing or stale)."""
    if importlib.util.find_spec("torch") is not None:
        return subprocess.call([sys.executable, "-m", "bench", *args.bench_args])
    if not _docker_ok(" (the benchmark runs in the 8gb image; or install the service: pip install -e '.[service]')"):
        return 1
    why = dk.needs_build("8gb")
    if why:
        print(f"building: {why}", flush=True)
        rc = cmd_build(argparse.Namespace(profile="8gb", model=None))
        if rc:
            return rc
    cmd = ["docker", "run", "--rm", "--gpus", "all", "--workdir", "/opt/vlkit", "--entrypoint", "python3",
           "-e", "PYTHONUNBUFFERED=1", images.SERVICE_IMAGE, "-m", "bench", *args.bench_args]
    print(f"$ {cp.quote(cmd)}", flush=True)
    return cp.run(cmd).returncode


# --- registration ----------------------------------------------------------------------------------
def _add_plan_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=("8gb", "16gb", "auto"), default="auto",
                   help="8gb: our transformers service; 16gb: vLLM; auto: pick from the card's VRAM")
    p.add_argument("--model", help="hub id or local directory (default: the service's default model)")
    p.add_argument("--context", type=int, help="wanted context length in tokens")
    p.add_argument("--gpu-memory", type=memory_arg, help="plan for a card of this size (e.g. 16GiB)")
    p.add_argument("--gpu-memory-utilization", type=float, help="16gb: use this instead of the planned value")


def register(subparsers) -> None:
    up = subparsers.add_parser("up", help="plan, build if needed, start and wait until the API is ready")
    _add_plan_inputs(up)
    # A string default: argparse converts it only when `up` runs, so a bad VLKIT_PORT is a clear error
    # there instead of a crash of every command.
    up.add_argument("--port", type=int, default=os.environ.get("VLKIT_PORT", str(cp.DEFAULT_PORT)),
                    help="host port, bound to 127.0.0.1 (default 8000)")
    up.add_argument("--dry-run", action="store_true", help="print the compose and container commands; start nothing")
    up.add_argument("--json", action="store_true", help="with --dry-run: machine-readable")
    up.add_argument("--no-build", action="store_true", help="fail instead of building a missing image")
    up.add_argument("--no-download", action="store_true", help="do not fetch the model into the cache first")
    up.add_argument("--cpu", action="store_true", help="test mode: 8gb service on CPU, no GPU reservation")
    up.add_argument("--skip-gate", action="store_true", help="start even when the GPU health check fails")
    up.add_argument("--timeout", type=float, default=1800, help="seconds to wait for readiness")
    up.set_defaults(func=cmd_up)

    down = subparsers.add_parser("down", help="stop and remove vlkit's containers (the cache stays)")
    down.set_defaults(func=cmd_down)

    logs = subparsers.add_parser("logs", help="the service's logs (follows; Ctrl-C to stop)")
    logs.add_argument("--tail", type=int, default=200)
    logs.add_argument("--no-follow", action="store_true")
    logs.set_defaults(func=cmd_logs)

    status = subparsers.add_parser("status", help="what runs, where, and whether it is ready")
    status.set_defaults(func=cmd_status)

    build = subparsers.add_parser("build", help="build the profile's image (8gb, 16gb, all, auto)")
    build.add_argument("--profile", choices=("8gb", "16gb", "all", "auto"), default="auto")
    build.add_argument("--model", help="with --profile auto: the model the profile is picked for")
    build.set_defaults(func=cmd_build)

    dl = subparsers.add_parser("download", help="fetch a model into the shared Hugging Face cache")
    dl.add_argument("model", help="hub id, e.g. Qwen/Qwen3-VL-4B-Instruct")
    dl.set_defaults(func=cmd_download)

    cap = subparsers.add_parser("caption", help="send one image through the API and print the answer")
    cap.add_argument("image", help="path to a .jpg/.png/.webp")
    cap.add_argument("--prompt", default="Describe this image in one or two sentences.")
    cap.add_argument("--port", type=int, help="default: the running service's port")
    cap.set_defaults(func=cmd_caption)

    clean = subparsers.add_parser("clean", help="remove containers and built images (keeps the model cache)")
    clean.add_argument("--model", help="also remove this model from the Hugging Face cache")
    clean.set_defaults(func=cmd_clean)

    # Every argument, options included, goes to `python -m bench` (`vlkit bench --models 2b`,
    # `vlkit bench -h` for its help): with '+' as this parser's option prefix none is its own.
    bench = subparsers.add_parser("bench", help="run the benchmark (python -m bench)", prefix_chars="+",
                                  add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
