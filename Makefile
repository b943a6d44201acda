# vlkit: thin targets over one Python CLI (`vlkit`, scripts/cli.py). `make` alone lists them.
# Variables: PROFILE=8gb|16gb|auto  MODEL=<hub id or dir>  IMG=<image>  PORT=8000  CONTEXT=<tokens>
#            GPU_MEMORY=<e.g. 16GiB, plan for another card>  GPUS=<GPUs per pod, k8s>  ARGS=<more vlkit flags>
SHELL := /bin/bash
.DEFAULT_GOAL := help

PROFILE ?= auto
MODEL ?=
IMG ?=
PORT ?=
CONTEXT ?=
GPU_MEMORY ?=
GPUS ?=
ARGS ?=

VENV := .venv
VLKIT := $(VENV)/bin/vlkit
HOST_STAMP := $(VENV)/.vlkit-host

export VLKIT_VIA_MAKE := 1

opt = $(if $(2),$(1) $(2))
PLAN_FLAGS = --profile $(PROFILE) $(call opt,--model,$(MODEL)) $(call opt,--context,$(CONTEXT)) $(call opt,--gpu-memory,$(GPU_MEMORY))

.PHONY: help up down logs status doctor health plan build test bench wsl-config wsl-restart download caption k8s clean

help: ## list the targets (this text)
	@echo "usage: make TARGET [PROFILE=8gb|16gb|auto] [MODEL=...] [IMG=...] [PORT=...] [ARGS=...]"
	@grep -E '^[a-z][a-z0-9-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):.*## (.*)/  \1\t\2/' | expand -t 16

# The host CLI's small venv (no torch): made on first use, refreshed when pyproject.toml changes.
# Tested on pip, not python: a venv made without python3-venv has python but no pip; rerunning
# `python3 -m venv` over it (once python3-venv is installed) completes it.
$(HOST_STAMP): pyproject.toml
	@test -x $(VENV)/bin/pip || python3 -m venv $(VENV) || { echo "vlkit: cannot make $(VENV): install python3-venv (sudo apt-get install python3-venv), then retry"; exit 1; }
	@$(VENV)/bin/pip install -q -e .
	@touch $@

up: $(HOST_STAMP) ## plan for this GPU, build if needed, start the API and wait until it is ready
	$(VLKIT) up $(PLAN_FLAGS) $(call opt,--port,$(PORT)) $(ARGS)

down: $(HOST_STAMP) ## stop and remove the containers (the model cache stays)
	$(VLKIT) down $(ARGS)

logs: $(HOST_STAMP) ## follow the service's logs
	$(VLKIT) logs $(ARGS)

status: $(HOST_STAMP) ## what runs, on which port, and whether it is ready
	$(VLKIT) status $(ARGS)

doctor: $(HOST_STAMP) ## check this machine: driver, CUDA, Docker, GPU runtime, WSL, memory
	$(VLKIT) doctor $(ARGS)

health: $(HOST_STAMP) ## the GPU health gate `make up` runs first
	$(VLKIT) health $(call opt,--profile,$(filter-out auto,$(PROFILE))) $(ARGS)

plan: $(HOST_STAMP) ## print the VRAM budget and the settings for this card (GPU_MEMORY= for another)
	$(VLKIT) plan $(PLAN_FLAGS) $(ARGS)

build: $(HOST_STAMP) ## build the profile's image (PROFILE=8gb|16gb|all)
	$(VLKIT) build --profile $(PROFILE) $(call opt,--model,$(MODEL)) $(ARGS)

download: $(HOST_STAMP) ## fetch MODEL=<hub id> into the shared Hugging Face cache (progress bar)
	@test -n "$(MODEL)" || { echo "usage: make download MODEL=Qwen/Qwen3-VL-4B-Instruct"; exit 2; }
	$(VLKIT) download "$(MODEL)" $(ARGS)

caption: $(HOST_STAMP) ## send IMG=<path> through the API and print the answer
	@test -n "$(IMG)" || { echo "usage: make caption IMG=photo.jpg"; exit 2; }
	$(VLKIT) caption "$(IMG)" $(call opt,--port,$(PORT)) $(ARGS)

bench: $(HOST_STAMP) ## measure decode speed and memory on this GPU (python -m bench, in the 8gb image)
	$(VLKIT) bench $(ARGS)

wsl-config: $(HOST_STAMP) ## set WSL2's memory/swap in .wslconfig for the profile (backup + atomic)
	$(VLKIT) wsl config $(call opt,--profile,$(filter-out auto,$(PROFILE))) $(ARGS)

wsl-restart: $(HOST_STAMP) ## wsl --shutdown, after listing what uses the GPU
	$(VLKIT) wsl restart $(ARGS)

k8s: $(HOST_STAMP) ## Kubernetes manifests for vLLM planned for GPU_MEMORY= x GPUS= per pod (ARGS=--output DIR)
	@test -n "$(GPU_MEMORY)" || { echo "usage: make k8s GPU_MEMORY=24GiB [GPUS=2] [MODEL=...] [CONTEXT=...] [ARGS='--output k8s/ --replicas 2']"; exit 2; }
	$(VLKIT) k8s --gpu-memory $(GPU_MEMORY) $(call opt,--gpus,$(GPUS)) $(call opt,--model,$(MODEL)) $(call opt,--context,$(CONTEXT)) $(ARGS)

clean: $(HOST_STAMP) ## remove containers and built images (keeps models; MODEL=<id> removes one)
	$(VLKIT) clean $(call opt,--model,$(MODEL)) $(ARGS)

test: ## install what the tests need (Docker engine, base image, venv), then run every test
	bash scripts/setup-test-env.sh
	$(VENV)/bin/python -m pytest $(ARGS)
