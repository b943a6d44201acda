"""The flags vlkit passes to vLLM, parsed by the pinned vLLM's OWN argument parser.

A flag vLLM renamed or removed, or a value it no longer accepts (e.g. the JSON form of
--limit-mm-per-prompt), fails here. Needs vLLM importable without a GPU; install it with the two
commands in tests/requirements-vllm.txt (vLLM without its dependencies, plus a few small modules).
"""
from __future__ import annotations

import json
import os
from importlib import metadata

import pytest

from scripts.images import VLLM_VERSION
from scripts.planner import plan_for
from scripts.planner.models import BUILTIN_IDS

GIB = 1024**3


def _installed_vllm() -> str | None:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def vllm_parser(tmp_path_factory):
    version = _installed_vllm()
    if version is None:
        # CI installs it (scripts/setup-test-env.sh): there a missing vLLM is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)("vllm is not installed: pip install --no-deps vllm==%s && pip install -r "
                    "tests/requirements-vllm.txt" % VLLM_VERSION)
    assert version == VLLM_VERSION, f"installed vllm {version}, pinned {VLLM_VERSION} (scripts/images.py)"
    try:
        import vllm.platforms
        from vllm.platforms.cpu import CpuPlatform
        # No GPU here: give vLLM a platform so its config defaults resolve (flag names don't depend on it).
        vllm.platforms.current_platform = CpuPlatform()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.entrypoints.openai.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as e:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"vllm {version} is installed but its CLI parser does not import: {e}")
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    # A local directory stands in for the model: offline, vLLM resolves hub ids to cached snapshots,
    # and the flags under test do not depend on which model it is.
    model_dir = tmp_path_factory.mktemp("model")
    return parser, EngineArgs, str(model_dir)


def _parse(vllm_parser, args: list[str]):
    parser, engine_args, model_dir = vllm_parser
    ns = parser.parse_args([model_dir, *args])
    ns.model = ns.model_tag or ns.model
    return ns, engine_args.from_cli_args(ns)


def _plans():
    for model in BUILTIN_IDS:
        for gb in (8, 12, 16, 24):
            for count in (1, 2):
                plan = plan_for(model=model, profile="16gb", gpu_memory_bytes=gb * GIB, gpu_count=count)
                if plan.fits:
                    yield pytest.param(plan, id=f"{model.split('/')[-1]}-{gb}GiB-x{count}")


@pytest.mark.parametrize("plan", list(_plans()))
def test_every_planned_command_parses_with_the_values_we_meant(vllm_parser, plan):
    ns, ea = _parse(vllm_parser, plan.vllm_args)
    args = plan.vllm_args
    value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    assert ea.gpu_memory_utilization == pytest.approx(float(value("--gpu-memory-utilization")))
    assert ea.max_model_len == plan.context
    assert ea.max_num_seqs == int(value("--max-num-seqs"))
    assert ea.max_num_batched_tokens == int(value("--max-num-batched-tokens"))
    assert ea.limit_mm_per_prompt == json.loads(value("--limit-mm-per-prompt"))
    assert ea.mm_processor_kwargs == json.loads(value("--mm-processor-kwargs"))
    assert ea.kv_cache_dtype == value("--kv-cache-dtype")
    assert ea.enforce_eager == ("--enforce-eager" in args)
    assert ea.tensor_parallel_size == (int(value("--tensor-parallel-size")) if "--tensor-parallel-size" in args else 1)


def test_the_evaluated_command_parses(vllm_parser):
    plan = plan_for(model="Qwen/Qwen3-VL-4B-Instruct-FP8", gpu_memory_bytes=8 * GIB,
                    gpu_memory_utilization=0.8, context=4096)
    _, ea = _parse(vllm_parser, plan.vllm_args)
    assert ea.gpu_memory_utilization == 0.8 and ea.max_model_len == 4096


def test_the_parser_rejects_a_flag_vllm_does_not_have(vllm_parser):
    # The control: if this passed, the tests above would prove nothing.
    with pytest.raises(SystemExit):
        _parse(vllm_parser, ["--gpu-memory-utilisation", "0.8"])
    with pytest.raises(SystemExit):
        _parse(vllm_parser, ["--kv-cache-dtype", "fp3"])
