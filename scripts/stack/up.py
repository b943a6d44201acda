"""`vlkit up` (make up), the user's first command: checks and the plan first, then build if needed,
start through docker compose, wait for readiness with a progress line, and print how to call it.
When something fails it shows the container's last log lines and what they mean."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from scripts import images
from scripts.hf_cache import hub_cache
from scripts.planner import options
from scripts.stack import compose as cp
from scripts.stack import docker as dk
from scripts.stack import preflight
from scripts.stack.client import examples, free_port_after, probe
from scripts.stack.diagnose import diagnose
from scripts.usage import command, setting

GIB = 1024 ** 3
CPU_PLAN_MEMORY = 8 * GIB   # CPU mode plans as for an 8 GB card (the profile it tests)


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def plan(args: argparse.Namespace):
    """The plan for `args` (the shared plan options); CPU mode plans the 8gb profile for an 8 GB card."""
    from scripts.planner import plan_for

    if args.cpu:
        args = argparse.Namespace(**{**vars(args), "profile": "8gb",
                                     "gpu_memory": args.gpu_memory or CPU_PLAN_MEMORY})
    return plan_for(**options.plan_kwargs(args))


def _launch(args: argparse.Namespace, plan) -> cp.Launch:
    return cp.Launch(profile=plan.profile, model=args.model, port=args.port,
                     service_env={k: str(v) for k, v in (plan.service_env or {}).items()},
                     vllm_args=[str(a) for a in (plan.vllm_args or [])], cpu=args.cpu,
                     vllm_env=images.vllm_env() if plan.profile == "16gb" else {},
                     hf_cache=hub_cache(), api_key=os.environ.get("VLKIT_API_KEY") or None)


def _show_plan_refusal(plan, whole_budget: str, asked: str) -> None:
    """``asked``: the profile the user asked for (auto tried both; the plan shown is the last one)."""
    which = "in either profile (8gb, 16gb)" if asked == "auto" else f"({plan.profile} profile)"
    preflight.error(f"the plan for {plan.model} does not fit this card {which}.")
    if plan.refusal:
        print(f"  why: {plan.refusal}", file=sys.stderr)  # the reason, then its own "Next step: ..."
    print(f"  `{whole_budget}` shows the whole budget.", file=sys.stderr)


def _gpu_fits_image(profile: str) -> bool:
    """The doctor's driver and GPU checks for this profile's image (a driver too old for its CUDA, a
    card older than it was built for): refused before the download and the build, which would end in
    a container that cannot start."""
    from types import SimpleNamespace

    from scripts.doctor.driver import driver_check, gpu_check
    from scripts.gpu import probe
    from wsl.host import detect_platform

    facts = SimpleNamespace(gpu=probe(), platform=detect_platform())
    if not facts.gpu.gpus:
        return True  # the health gate says why
    refused = [c for c in (driver_check(facts, profile), gpu_check(facts, profile)) if c.status == "fail" and c.blocking]
    for check in refused:
        preflight.error(f"{check.name}: {check.found}; nothing was started.")
        if check.fix:
            print(f"  fix: {check.fix}", file=sys.stderr)
    return not refused


def _gate(plan) -> bool:
    from wsl.health import gate

    result = gate(plan.required_free_bytes)
    if result.ok:
        return True
    preflight.error("the GPU health check failed, nothing was started:")
    for reason in result.reasons:
        print(f"  - {reason}", file=sys.stderr)
    for fix in result.fixes:
        print(f"  fix: {fix}", file=sys.stderr)
    return False


def _env_header(launch: cp.Launch) -> str:
    return (f"Written by `vlkit up` from the plan ({launch.profile} profile, {launch.model}); "
            f"regenerated on every start.\nEdit the plan's inputs (`{command('up', model='...', context='...')}`), "
            "not this file.")


def _print_failure(launch: cp.Launch, text: str, cid: str | None, again) -> None:
    """The container's last lines, then each known cause and its fix (`again`: the user's command)."""
    con = _console()
    logs = dk.logs_tail(cid, 40) if cid else ""
    if logs.strip():
        con.print(f"[bold]last log lines of {launch.service}:[/bold]")
        print(logs.rstrip(), flush=True)  # unwrapped, as the container wrote them
    found = diagnose(text + "\n" + logs, again)
    for d in found:  # soft_wrap: a fix holds commands to copy, so rich must not break its lines
        con.print(f"[bold red]cause:[/bold red] {d.cause}", markup=True, soft_wrap=True)
        con.print(f"[bold green]fix:[/bold green] {d.fix}", markup=True, soft_wrap=True)
    if not found:
        con.print(f"Not a known cause. Full logs: `{command('logs')}`; checks: `{command('doctor')}`.")


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
                if state.status == "running":  # its restart policy started it again: the exit code is gone
                    return False, f"the container exited and Docker restarted it ({state.restarts} time(s))"
                return False, f"the container stopped (exit code {state.exit_code}) {state.error}"
            if state.health == "unhealthy":
                return False, "the container's health check failed"
            phase = "loading the model" if status == 503 else "starting the server"
            last = dk.logs_tail(cid, 1).strip().splitlines()
            detail = f": {last[-1][:90]}" if last else ""
            progress.update(task, description=f"{launch.service}: {phase}{detail}")
            time.sleep(poll)
    return False, f"not ready after {timeout:.0f} s"


def _refused_before_planning(args: argparse.Namespace) -> int | None:
    """The exit code when the command line itself cannot work, after saying why."""
    if args.cpu and args.profile == "16gb":
        preflight.error(f"{setting('cpu')} runs the 8gb service without a GPU; vLLM (16gb) needs a GPU: "
                        f"`{command('up', profile='8gb', cpu=True)}`.")
        return 2
    if preflight.looks_like_a_path(args.model) and not Path(args.model).expanduser().is_dir():
        given = Path(args.model).expanduser()
        preflight.error(f"{setting('model', args.model)}: a file, not the model's folder: {setting('model', given.parent)}?"
                        if given.is_file() else f"{setting('model', args.model)}: no such folder (a hub id looks "
                        "like Qwen/Qwen3-VL-2B-Instruct).")
        return 2
    return None


def _same(target: str, args: argparse.Namespace, given_model: str | None, **changes) -> str:
    """The user's `up` as `target` ("up", or "plan" for its budget), with `changes`: a command to copy
    keeps PROFILE, MODEL, ARGS=--cpu, ... (`plan` gets what --cpu plans for instead of --cpu)."""
    cpu = target == "up" and args.cpu
    gpu_memory = args.gpu_memory or (CPU_PLAN_MEMORY if args.cpu and target == "plan" else None)
    profile = "8gb" if args.cpu and target == "plan" else args.profile
    given = dict(profile=None if profile == "auto" else profile, model=given_model, context=args.context,
                 gpu_memory=f"{gpu_memory / GIB:g}GiB" if gpu_memory else None,
                 gpu_memory_utilization=args.gpu_memory_utilization,
                 port=args.port if target == "up" else None, cpu=cpu or None)
    return command(target, **{**given, **changes})


# The user's `up` in CPU mode: the 8gb service, no card to plan for.
ON_THE_CPU = dict(profile="8gb", cpu=True, gpu_memory=None)


def users_command(args: argparse.Namespace, given_model: str | None, given_port: int | None):
    """`again(target, **changes)`: the user's `up` (or `plan`) with changes, for fixes to copy."""
    return lambda target, **changes: _same(target, args, given_model,
                                           **{"port": given_port if target == "up" else None, **changes})


def _port_taken(launch: cp.Launch) -> str | None:
    """What holds the port when it is not one of vlkit's own containers (compose replaces those)."""
    from scripts.stack.client import port_free, what_answers

    if port_free(launch.port) or launch.port in {dk.published_port(s) for s in cp.SERVICES.values()}:
        return None
    return what_answers(launch.port, launch.api_key) or "a program that does not accept connections"


def cmd_up(args: argparse.Namespace) -> int:
    given_model, given_port = args.model, args.port
    args.model = args.model or options.default_model()
    args.port = args.port or preflight.default_port()
    again = users_command(args, given_model, given_port)  # the commands fixes tell to run
    code = _refused_before_planning(args)
    if code is not None:
        return code
    try:
        planned = plan(args)
    except options.NoGpu as e:
        if args.dry_run:
            card = "16GiB" if args.profile == "16gb" else "8GiB"
            preflight.error(f"no NVIDIA GPU answers here ({e}): give the card's size to plan for, "
                            f"`{_same('up', args, given_model, gpu_memory=card, port=given_port, dry_run=True)}`.")
        else:
            preflight.error(preflight.no_gpu_line(str(e), "nothing was started", again("up", **ON_THE_CPU)))
        return 2 if args.dry_run else 3
    except (ValueError, FileNotFoundError, LookupError) as e:
        from scripts.planner import UnknownModelError

        preflight.error(f"cannot plan for {args.model}: {e}")
        if not isinstance(e, UnknownModelError):  # a bad MODEL is the whole story
            print(f"  `{command('doctor')}` checks the driver, the GPU and Docker.", file=sys.stderr)
        return 2
    if not planned.fits:
        _show_plan_refusal(planned, _same("plan", args, given_model), "8gb" if args.cpu else args.profile)
        return 2
    launch = _launch(args, planned)
    if launch.local_model_dir and launch.profile == "8gb":
        problem = preflight.model_folder_problem(launch.local_model_dir)
        if problem:
            preflight.error(problem)
            return 2
    if args.dry_run:
        return _print_dry_run(args, launch)
    if not args.cpu and not args.skip_gate:
        missing = preflight.gpu_missing() if args.gpu_memory else None  # else planning found the GPU
        if missing:
            preflight.error(preflight.no_gpu_line(missing, "nothing was started", again("up", **ON_THE_CPU)))
            return 3
        if not _gate(planned) or not _gpu_fits_image(launch.profile):
            return 3
    if not preflight.docker_ok():
        return 1
    taken = _port_taken(launch)
    if taken:  # before the download and the build, which take minutes
        preflight.error(f"127.0.0.1:{launch.port} is taken by {taken}; nothing was started. Use another "
                        f"port: `{_same('up', args, given_model, port=free_port_after(launch.port))}`, "
                        f"or stop that program.")
        return 1
    if not args.cpu and not args.skip_gate:
        problem = preflight.docker_gpu_problem(cp.run(["docker", "info", "--format", "{{json .}}"], capture=True).stdout)
        if problem:
            preflight.error(problem)
            return 1
    if not launch.local_model_dir and not args.no_download:
        from scripts.stack.download import DownloadError, download

        try:
            download(launch.model)
        except DownloadError as e:
            preflight.error(str(e))
            return 1
    return _start(args, launch, again)


def _start(args: argparse.Namespace, launch: cp.Launch, again) -> int:
    from scripts.stack.build import build

    why = dk.needs_build(launch.profile)
    if why and args.no_build:
        preflight.error(f"{why}; run `{command('build', profile=launch.profile)}` (or drop {setting('no_build')}).")
        return 1
    if why:
        print(f"building: {why}", flush=True)
        code = build([launch.profile])
        if code:
            return code
    env = launch.interpolation_env()
    for path, text in ((cp.ENV_FILE, cp.render_env_file(launch.env_file_values(), _env_header(launch))),
                       (cp.OVERRIDE_FILE, launch.override_text())):
        backup = cp.write_generated(path, text)
        if backup:
            print(f"{path} had changes vlkit did not write (or came from an older vlkit): kept in {backup.name}. "
                  "vlkit rewrites it from the plan on every start; change the plan's inputs instead "
                  f"(`{command('up', model='...', context='...')}`).")
    Path(env["VLKIT_HF_CACHE"]).mkdir(parents=True, exist_ok=True)  # bind source: the host's hub cache
    cp.run(cp.compose_cmd(None, "rm", "--stop", "--force", *launch.other_services()), env=env, capture=True)
    res = cp.run(launch.compose_up(), env=env, capture=True)
    if res.returncode != 0:
        preflight.error("docker compose could not start the service:")
        print((res.stderr or res.stdout).strip(), file=sys.stderr)
        _print_failure(launch, res.stderr + res.stdout, dk.container_id(launch.service), again)
        # A container compose created but could not start (no GPU runtime, say) is not left behind.
        cp.run(cp.compose_cmd(launch.profile, "rm", "--stop", "--force", launch.service), env=env, capture=True)
        return 1
    ok, why = wait_ready(launch, args.timeout)
    if not ok:
        cid = dk.container_id(launch.service)
        preflight.error(f"{launch.service} did not become ready: {why}")
        _print_failure(launch, why, cid, again)
        cp.run(cp.compose_cmd(launch.profile, "stop", launch.service), env=env, capture=True)
        print(f"stopped {launch.service}; `{command('logs')}` shows everything, `{command('down')}` removes it.",
              file=sys.stderr)
        return 1
    con = _console()
    con.print(f"\n[bold green]vlkit is up[/bold green]: {launch.url}/v1  (model: {launch.served_model_name}, "
              f"{launch.profile} profile{', CPU mode' if launch.cpu else ''})")
    # Plain print: rich would wrap the long lines to the terminal and break copy-paste.
    print(examples(launch.url, launch.served_model_name, api_key=bool(launch.api_key)))
    print(f"Next: `{command('caption', image='photo.jpg')}`, `{command('status')}`, `{command('logs')}`, "
          f"`{command('down')}`.")
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


def register(subparsers) -> None:
    up = subparsers.add_parser("up", help="plan, build if needed, start and wait until the API is ready")
    options.add(up, "profile", "model", "context", "gpu_memory", "gpu_memory_utilization")
    up.add_argument("--port", type=options.port, help="host port, bound to 127.0.0.1 (default $VLKIT_PORT, else 8000)")
    up.add_argument("--dry-run", action="store_true", help="print the compose and container commands; start nothing")
    up.add_argument("--json", action="store_true", help="with --dry-run: machine-readable")
    up.add_argument("--no-build", action="store_true", help="fail instead of building a missing image")
    up.add_argument("--no-download", action="store_true", help="do not fetch the model into the cache first")
    up.add_argument("--cpu", action="store_true",
                    help="try it without a GPU: the 8gb service on the CPU, no GPU reservation (slow)")
    up.add_argument("--skip-gate", action="store_true", help="start even when the GPU health check fails")
    up.add_argument("--timeout", type=options.at_least(1), default=1800, help="seconds to wait for readiness")
    up.set_defaults(func=cmd_up)
