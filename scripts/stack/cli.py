"""`vlkit up | down | logs | status | build | download | caption | clean | bench` (the make targets).

`up` lives in up.py, `status/down/logs` in running.py, `build` in build.py; the small ones here."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from scripts import images
from scripts.hf_cache import hub_cache
from scripts.stack import build, running, up
from scripts.stack import compose as cp
from scripts.stack import docker as dk
from scripts.stack import preflight
from scripts.stack.client import DEFAULT_PROMPT, ServiceError, caption
from scripts.usage import command

GIB = 1024 ** 3


def cmd_download(args: argparse.Namespace) -> int:
    from scripts.stack.download import DownloadError, download

    model = args.model or args.model_option
    if not model:
        preflight.error(f"which model? `{command('download', model='Qwen/Qwen3-VL-4B-Instruct')}`")
        return 2
    if Path(model).expanduser().is_dir():
        print(f"{model} is a model folder: nothing to download; `{command('up', model=model)}` serves it "
              "from there.")
        return 0
    try:
        path = download(model)
    except DownloadError as e:
        preflight.error(str(e))
        return 1
    print(f"{model} is in the shared cache: {path}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    image = args.image or args.image_option
    if not image:
        preflight.error(f"which image? `{command('caption', image='photo.jpg')}`")
        return 2
    port = args.port
    if shutil.which("docker"):  # the running service's port; without Docker, the default one
        for service in cp.SERVICES.values():
            port = port or dk.published_port(service)
    port = port or preflight.default_port()
    try:
        print(caption(f"http://127.0.0.1:{port}", Path(image), prompt=args.prompt,
                      api_key=os.environ.get("VLKIT_API_KEY")))
    except ServiceError as e:
        preflight.error(str(e))
        return 1
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    docker = preflight.docker_ok()  # without it, what needs no Docker is still cleaned (the model cache)
    if docker:
        cp.run(cp.compose_cmd(None, "down", "--remove-orphans"))
        removed = []
        for tag in (images.SERVICE_IMAGE, images.VLLM_SERVICE_IMAGE):
            if dk.image_exists(tag):
                cp.run(["docker", "image", "rm", tag])
                removed.append(tag)
        for path in (cp.ENV_FILE, cp.OVERRIDE_FILE):
            backup = cp.discard_generated(path)
            if backup:
                print(f"removed {path.name}; it had changes vlkit did not write (or came from an older vlkit): kept in {backup.name}.")
        print(f"removed the images {', '.join(removed)}." if removed else "no vlkit image to remove.")
    else:
        print("containers, images and the generated files left as they are (Docker is not available).")
    if args.model:
        from scripts.stack.download import remove_from_cache

        freed = remove_from_cache(args.model)
        print(f"removed {args.model} from the cache ({freed / GIB:.2f} GiB)" if freed else
              f"{args.model} is not in the cache {hub_cache()}: nothing removed.")
    else:
        print(f"kept the model cache ({hub_cache()}); `{command('clean', model='org/name')}` removes a model.")
    return 0 if docker else 1


def _bench_needs_no_gpu(bench_args: list[str]) -> bool:
    """The bench arguments that ask for the CPU on purpose (bench/decode_bench.py): --smoke, --device
    cpu, or its help."""
    words = " ".join(bench_args).replace("=", " ").split()
    pairs = zip(words, words[1:] + [""])
    return any(w in ("--smoke", "-h", "--help") or (w == "--device" and nxt == "cpu") for w, nxt in pairs)


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark measures a GPU: refused at once without one (unless asked for the CPU), run
    here when this Python has torch (a service venv), else inside the 8gb image on the GPU."""
    on_cpu = _bench_needs_no_gpu(args.bench_args)
    has_torch = importlib.util.find_spec("torch") is not None
    missing = None if on_cpu else preflight.gpu_missing()
    if missing:
        preflight.error(f"`{command('bench')}` measures a GPU and none answers here ({missing}); run it on the "
                        f"GPU machine. `{command('bench', smoke=True)}` checks the benchmark itself on the CPU.")
        return 3
    if has_torch:
        return subprocess.call([sys.executable, "-m", "bench", *args.bench_args])
    if on_cpu:
        preflight.error(f"{' '.join(args.bench_args)} runs on this machine's Python, which has no torch: "
                        "install the service first (`.venv/bin/pip install -e '.[service]'`, or `make test`).")
        return 2
    if not preflight.docker_ok(" (the benchmark runs in the 8gb image; or install the service: "
                               "pip install -e '.[service]')"):
        return 1
    why = dk.needs_build("8gb")
    if why:
        print(f"building: {why}", flush=True)
        rc = build.build(["8gb"])
        if rc:
            return rc
    cmd = ["docker", "run", "--rm", "--gpus", "all", "--workdir", "/opt/vlkit", "--entrypoint", "python3",
           "-e", "PYTHONUNBUFFERED=1", images.SERVICE_IMAGE, "-m", "bench", *args.bench_args]
    print(f"$ {cp.quote(cmd)}", flush=True)
    return cp.run(cmd).returncode


def register(subparsers) -> None:
    from scripts.planner.options import port

    up.register(subparsers)
    running.register(subparsers)
    build.register(subparsers)

    dl = subparsers.add_parser("download", help="fetch a model into the shared Hugging Face cache")
    dl.add_argument("model", nargs="?", help="hub id, e.g. Qwen/Qwen3-VL-4B-Instruct")
    dl.add_argument("--model", dest="model_option", metavar="ID", help="the same, as an option")
    dl.set_defaults(func=cmd_download)

    cap = subparsers.add_parser("caption", help="send one image through the API and print the answer")
    cap.add_argument("image", nargs="?", help="path to a .jpg/.png/.webp")
    cap.add_argument("--image", dest="image_option", metavar="PATH", help="the same, as an option")
    cap.add_argument("--prompt", default=DEFAULT_PROMPT)
    cap.add_argument("--port", type=port, help="default: the running service's port")
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
