"""`vlkit k8s`: the plan for a GPU size and count, as Kubernetes manifests (stdout or a folder).

Exit 0 written, 1 bad input it checks (one line), 2 a flag argparse refuses (its usage line), 3 the
plan does not fit (the planner's refusal; nothing is written).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from scripts.k8s import names
from scripts.planner.cli import EXIT_DOES_NOT_FIT
from scripts.planner.options import at_least, context_tokens
from scripts.planner.sizes import memory_arg, parse_size
from scripts.safe_file import FileEditError
from scripts.usage import command, setting

EXIT_WRITTEN, EXIT_ERROR = 0, 1
GIB = 1024**3
_count = at_least(1)


def _volume_size(text: str) -> int:
    """Whole GiB from 50GiB, 50G or Kubernetes' own 50Gi / 1Ti."""
    spelled = text.strip()
    if spelled[-2:].lower() in ("gi", "ti", "mi"):
        spelled += "B"  # Kubernetes quantities are the binary units the sizes parser knows as GiB
    try:
        return -(-parse_size(spelled) // GIB)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a volume size: {text!r} (examples: 50Gi, 100GiB, 1Ti)") from None


def register(subparsers) -> None:
    from service.settings import ServiceSettings

    p = subparsers.add_parser(
        "k8s", help="write Kubernetes manifests for vLLM, planned for the cluster's GPUs",
        description="Kubernetes manifests for the 16gb profile (vLLM) from the plan for one GPU size and "
                    "count: a StatefulSet (the planned vLLM flags, tensor parallel over the pod's GPUs, a "
                    "cache volume per replica, probes) and its ClusterIP Service. To stdout, or one file "
                    "per object with --output. Exit 0 written, 1 bad input, 2 a malformed flag, 3 the "
                    "plan does not fit.")
    p.add_argument("--model", default=ServiceSettings.model_fields["model"].default,
                   help="Hugging Face hub id the pods download and serve (default: %(default)s)")
    p.add_argument("--gpu-memory", type=memory_arg, required=True, metavar="SIZE",
                   help="memory of ONE GPU on the cluster's nodes (24GiB, 48GB, 80GiB)")
    # Only to say so: the manifests run vLLM, so `make k8s PROFILE=8gb` is refused, not ignored.
    p.add_argument("--profile", type=str.lower, choices=("auto", "16gb", "8gb"), default="16gb",
                   help="16gb (vLLM), the only profile the manifests run; auto means 16gb here")
    p.add_argument("--gpus", type=_count, default=1, metavar="N",
                   help="GPUs per pod: vLLM's --tensor-parallel-size (a node must have N free)")
    p.add_argument("--context", type=context_tokens, metavar="TOKENS", help="wanted context (prompt + answer)")
    p.add_argument("--replicas", type=_count, default=1, metavar="N",
                   help="pods behind the Service, N x GPUS GPUs in all (default: 1)")
    p.add_argument("--name", type=names.object_name, help="StatefulSet and Service name (default: vlkit-<model>)")
    p.add_argument("--namespace", type=names.namespace, metavar="NAME", help="default: none written (kubectl's current namespace)")
    p.add_argument("--storage-class", type=names.storage_class, metavar="NAME",
                   help="StorageClass of the cache volumes (default: the cluster's default class)")
    p.add_argument("--cache-size", type=_volume_size, metavar="SIZE",
                   help="size of each replica's cache volume (50Gi; default: from the model's weights)")
    p.add_argument("--api-key-secret", type=names.secret_name, metavar="SECRET",
                   help="require `Authorization: Bearer <key>`, the key read from this Secret's key `api-key`")
    p.add_argument("--hf-token-secret", type=names.secret_name, metavar="SECRET",
                   help="Secret with key `token`: a Hugging Face token for gated or private models")
    p.add_argument("--image-pull-secret", type=names.secret_name, metavar="SECRET",
                   help="imagePullSecret for the vLLM image (a registry mirror, Docker Hub limits)")
    p.add_argument("--runtime-class", type=names.runtime_class, metavar="NAME",
                   help="runtimeClassName, e.g. nvidia where the NVIDIA runtime is not containerd's default (k3s)")
    p.add_argument("--node-selector", type=names.node_label, action="append", default=[], metavar="KEY=VALUE",
                   help="schedule only on nodes with this label, e.g. nvidia.com/gpu.product=NVIDIA-L4 (repeatable)")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="no download init container: the volumes are populated beforehand (air-gapped clusters)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="write service.yaml and statefulset.yaml into DIR (default: one YAML stream to stdout)")
    p.set_defaults(func=run)


def _err(msg: str) -> None:
    print(f"vlkit k8s: {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from scripts.k8s import manifests as mf
    from scripts.k8s import resources as res
    from scripts.planner import UnknownModelError, plan_for, resolve_model

    if args.profile == "8gb":
        _err(f"{setting('profile', '8gb')} is not for Kubernetes: the manifests run vLLM (the 16gb profile); "
             f"drop {setting('profile', '8gb')}")
        return EXIT_ERROR
    if Path(args.model).expanduser().is_dir():
        _err(f"--model {args.model} is a local directory, which the cluster's pods cannot see: pass the "
             "model's Hugging Face hub id (the pods download it into their cache volume)")
        return EXIT_ERROR
    if args.output is not None and not args.output.strip():  # Path("") would be this folder
        _err("--output is empty: give a folder (created if missing), or leave it out for one stream on stdout")
        return EXIT_ERROR
    args.output = Path(args.output).expanduser() if args.output is not None else None
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        _err(f"--output {args.output} is a file: give a folder (created if missing)")
        return EXIT_ERROR
    if args.hf_token_secret and not args.download:
        _err("--hf-token-secret is for the download the pods do; with --no-download nothing reads it: drop one")
        return EXIT_ERROR
    try:
        plan = plan_for(model=args.model, profile="16gb", gpu_memory_bytes=args.gpu_memory,
                        gpu_count=args.gpus, context=args.context, service_option=False)
        weight_bytes = resolve_model(args.model).weight_bytes
    except (UnknownModelError, ValueError) as e:
        _err(str(e))
        return EXIT_ERROR
    if not plan.fits:
        _err(f"the plan for {plan.model} on {args.gpus} x {args.gpu_memory / GIB:g} GiB does not fit; "
             "nothing was written.")
        print(f"  {plan.refusal}", file=sys.stderr)
        print(f"  `{command('plan', profile='16gb', model=args.model, gpu_memory=f'{args.gpu_memory // 2**20}MiB', gpus=args.gpus)}` "
              "shows the whole budget.", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    if args.cache_size is not None and args.cache_size * GIB < weight_bytes:
        _err(f"--cache-size {args.cache_size}Gi cannot hold {plan.model}'s weights ({weight_bytes / GIB:.1f} GiB); "
             f"the size it is given without --cache-size: {res.cache_gib(weight_bytes)}Gi")
        return EXIT_ERROR
    cluster = mf.Cluster(
        name=args.name or names.default_name(plan.model), namespace=args.namespace, replicas=args.replicas,
        storage_class=args.storage_class, cache_gib=args.cache_size or res.cache_gib(weight_bytes),
        api_key_secret=args.api_key_secret, hf_token_secret=args.hf_token_secret,
        image_pull_secret=args.image_pull_secret, runtime_class=args.runtime_class,
        node_selector=tuple(args.node_selector), download=args.download)
    objects = mf.manifests(plan, cluster)
    if args.output is None:
        sys.stdout.write(mf.stream(plan, objects))
        return EXIT_WRITTEN
    try:
        write_folder(args.output, mf.files(plan, objects))
    except (OSError, FileEditError) as e:
        _err(f"cannot write {args.output}: {e}")
        return EXIT_ERROR
    print(f"apply with: kubectl apply -f {shlex.quote(str(args.output))}", file=sys.stderr)
    return EXIT_WRITTEN


def write_folder(folder: Path, contents: dict[str, str]) -> None:
    """Each file atomically; a file that would change is backed up first (it may hold the user's
    edits), one that would not is left alone."""
    from scripts.safe_file import make_backup, open_regular, write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    olds = {}
    for name in contents:  # all read before any is written: a refused one leaves the folder as it was
        path = folder / name
        olds[name] = None
        if path.exists() or path.is_symlink():
            with open_regular(path) as f:  # a FIFO or a device there is refused, not read for ever
                olds[name] = f.read()
    for name, text in contents.items():
        path = folder / name
        data = text.encode("utf-8")
        old = olds[name]
        if old == data:
            print(f"{path}: unchanged", file=sys.stderr)
            continue
        if old is not None:
            backup = make_backup(path, old, like=path.stat())
            print(f"{path}: the previous version is kept as {backup.name}", file=sys.stderr)
        write_atomic(path, data, expect=old)
        print(f"{path}: written", file=sys.stderr)
