# vlkit: thin targets over one Python CLI (`vlkit`, scripts/cli.py). `make` alone lists them.
# Settings are make variables (`make plan GPU_MEMORY=8GiB`), never flags: make reads `--gpu-memory`
# as an option of its own. Any other vlkit flag goes in ARGS (`make up ARGS='--cpu --timeout 600'`).
# A variable's `#:` comment is its line in `make help`; scripts/usage.py maps them to vlkit's flags.
# They come from make's command line only: a PORT or MODEL exported in your shell for something else
# does not steer make (plain `=`, which the environment does not override; `make -e` lets it).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PROFILE = auto#: 8gb (vlkit's service) | 16gb (vLLM) | auto (picked from the card's VRAM) | all (build)
MODEL =#: hub id (Qwen/Qwen3-VL-4B-Instruct) or a local model folder
GPU_MEMORY =#: plan for a card of this size instead of this machine's (8GiB, 16GB)
CONTEXT =#: wanted context in tokens (prompt + answer): 4096, or as vLLM reads it, 4K (4096), 4k (4000)
PORT =#: the API's port on 127.0.0.1 (default 8000)
IMG =#: the image `make caption` sends
GPUS =#: GPUs to split the model over (tensor parallel): per pod for `make k8s`, and `make plan`
ARGS =#: more vlkit flags, e.g. ARGS=--cpu (no GPU: the service on the CPU), ARGS=--dry-run

VENV := .venv
VLKIT := $(VENV)/bin/vlkit
HOST_STAMP := $(VENV)/.vlkit-host

export VLKIT_VIA_MAKE := 1

# `--flag='value'`, quoted for the shell: a folder with spaces (/mnt/c/Users/Jane Doe/...) stays one word, and a
# value that starts with - (GPU_MEMORY=-8GiB) is the flag's value, not another flag. Empty: left out.
opt = $(if $(2),$(1)='$(subst ','\'',$(2))')
PLAN_FLAGS = $(call opt,--profile,$(PROFILE)) $(call opt,--model,$(MODEL)) $(call opt,--context,$(CONTEXT)) $(call opt,--gpu-memory,$(GPU_MEMORY))

.PHONY: help up down logs status doctor health plan build test bench wsl-config wsl-restart download caption k8s clean

help: ## list the targets and the variables (this text)
	@echo "usage: make TARGET [VARIABLE=value ...]"
	@echo "targets:"
	@grep -E '^[a-z][a-z0-9-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):.*## (.*)/  \1\t\2/' | expand -t 16
	@echo "variables (make's own, set on its command line; not flags: GPU_MEMORY=8GiB, not --gpu-memory 8GiB):"
	@grep -E '^[A-Z_]+ =.*#: ' $(MAKEFILE_LIST) | sed -E 's/^([A-Z_]+) =.*#: (.*)/  \1\t\2/' | expand -t 16

# The host CLI's small venv (no torch): made on first use, refreshed when pyproject.toml changes.
# Tested on pip, not python: a venv made without python3-venv has python but no pip; rerunning
# `python3 -m venv` over it (once python3-venv is installed) completes it. All on stderr: stdout is the
# command's own (`make plan ARGS=--json | jq` on a first run).
$(HOST_STAMP): pyproject.toml
	@if [[ -e $@ ]]; then echo "vlkit: updating the host tools in $(VENV) (pyproject.toml changed)..." >&2; \
	 elif [[ -x $(VENV)/bin/pip ]]; then echo "vlkit: installing the host tools into the existing $(VENV)..." >&2; \
	 else echo "vlkit: first run: installing the host tools into $(VENV) (no torch; about 30 s, once)..." >&2; fi
	@test -x $(VENV)/bin/pip || python3 -m venv $(VENV) >&2 || { echo "vlkit: cannot make $(VENV): install python3-venv (sudo apt-get install python3-venv), then retry" >&2; exit 1; }
	@$(VENV)/bin/pip install -q --disable-pip-version-check --no-warn-conflicts -e . >&2 || { echo "vlkit: installing the host tools failed (pip's output above); fix that, then retry" >&2; exit 1; }
	@touch $@

up: $(HOST_STAMP) ## plan for this GPU, build if needed, start the API and wait until it is ready
	@$(VLKIT) up $(PLAN_FLAGS) $(call opt,--port,$(PORT)) $(ARGS)

down: $(HOST_STAMP) ## stop and remove the containers (the model cache stays)
	@$(VLKIT) down $(ARGS)

logs: $(HOST_STAMP) ## follow the service's logs
	@$(VLKIT) logs $(ARGS)

status: $(HOST_STAMP) ## what runs, on which port, and whether it is ready
	@$(VLKIT) status $(call opt,--port,$(PORT)) $(ARGS)

doctor: $(HOST_STAMP) ## check this machine: WSL, driver, GPU, Docker and its GPU runtime, disk, port, the plan
	@$(VLKIT) doctor $(call opt,--profile,$(PROFILE)) $(call opt,--model,$(MODEL)) $(call opt,--port,$(PORT)) $(ARGS)

health: $(HOST_STAMP) ## the GPU health gate `make up` runs first
	@$(VLKIT) health $(call opt,--profile,$(PROFILE)) $(call opt,--model,$(MODEL)) $(ARGS)

plan: $(HOST_STAMP) ## print the VRAM budget and the settings for this card (GPU_MEMORY= for another; exit 3: it does not fit)
	@$(VLKIT) plan $(PLAN_FLAGS) $(call opt,--gpus,$(GPUS)) $(ARGS)

build: $(HOST_STAMP) ## build the profile's image (PROFILE=8gb|16gb|all; auto: the one this card gets)
	@$(VLKIT) build $(PLAN_FLAGS) $(ARGS)

download: $(HOST_STAMP) ## fetch MODEL=<hub id> into the shared Hugging Face cache (progress bar)
	@$(VLKIT) download $(call opt,--model,$(MODEL)) $(ARGS)

caption: $(HOST_STAMP) ## send IMG=<path> through the API and print the answer
	@$(VLKIT) caption $(call opt,--image,$(IMG)) $(call opt,--port,$(PORT)) $(ARGS)

bench: $(HOST_STAMP) ## measure decode speed and memory on this GPU (python -m bench; in the 8gb image without torch here)
	@$(VLKIT) bench $(ARGS)

wsl-config: $(HOST_STAMP) ## set WSL2's memory/swap in .wslconfig for the profile (auto: up's pick; backup + atomic)
	@$(VLKIT) wsl config $(PLAN_FLAGS) $(ARGS)

wsl-restart: $(HOST_STAMP) ## wsl --shutdown, after listing what uses the GPU
	@$(VLKIT) wsl restart $(ARGS)

k8s: $(HOST_STAMP) ## Kubernetes manifests for vLLM planned for GPU_MEMORY= x GPUS= per pod (ARGS=--output DIR)
	@test -n "$(GPU_MEMORY)" || { echo "usage: make k8s GPU_MEMORY=24GiB [GPUS=2] [MODEL=...] [CONTEXT=...] [ARGS='--output k8s/ --replicas 2']"; exit 2; }
	@$(VLKIT) k8s $(call opt,--profile,$(PROFILE)) $(call opt,--gpu-memory,$(GPU_MEMORY)) $(call opt,--gpus,$(GPUS)) $(call opt,--model,$(MODEL)) $(call opt,--context,$(CONTEXT)) $(ARGS)

clean: $(HOST_STAMP) ## remove containers and built images (keeps models; MODEL=<id> removes one)
	@$(VLKIT) clean $(call opt,--model,$(MODEL)) $(ARGS)

# The venv first; Docker, compose and the base image only when a selected test needs them
# (tests/conftest.py asks scripts/setup-test-env.sh for them), so `ARGS='-m "not docker"'` installs none.
test: ## install what the tests need (venv; Docker engine and base image for the Docker tests), run them
	@bash scripts/setup-test-env.sh venv
	@env -u VLKIT_VIA_MAKE VLKIT_TEST_SETUP=1 $(VENV)/bin/python -m pytest $(ARGS)
