"""The running batch on the device: its rows' slots in the paged KV cache, their prefill and decode step.

The one place that touches the KV cache. The scheduler starts requests (`start`: a slot and the
blocks for prompt + max_tokens, sharing the blocks of a cached prefix), runs their prefill a pass
at a time (`prefill`: up to one chunk of prompt tokens, pieces of several prompts packed), decodes
every prefilled row a step (`decode`), and keeps or frees rows (`keep`, `drop`, `release`); it
never sees slots or blocks.

Rows keep their order: a row's index is its place in ``slots``, and prompts that finish their
prefill join after the running rows, in the order they were started. Each decode step is replayed
from CUDA graphs on CUDA.
"""
from __future__ import annotations

from typing import Any

import torch

from service.decode import DecodeRunner, PagedKVCache, Qwen3VLDecoder, Qwen3VLPrefill
from service.decode.qwen3_prefill import PrefillJob
from service.engine.requests import GenerationRequest


class PrefillFailed(Exception):
    """A prefill pass raised: ``owners`` are the requests it was computing (their slots are freed)."""

    def __init__(self, owners: list[Any], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.owners = owners
        self.cause = cause


class Batch:
    def __init__(self, runner: DecodeRunner, prefiller: Qwen3VLPrefill, *, max_images_per_pass: int | None = None,
                 reserved_ceiling: int | None = None):
        """max_images_per_pass: prompts holding image features in one pass at most (the memory plan
        measured the largest request's); reserved_ceiling: torch's reserved bytes above which the
        allocator hands cached blocks back after a pass (passes of changing shapes grow its share
        beyond what the budget counts)."""
        self.runner = runner
        self.cache = runner.cache
        self.prefiller = prefiller
        self.slots: list[int] = []  # decoding rows
        self.jobs: list[PrefillJob] = []  # started, not prefilled yet, in order
        self._max_images = max_images_per_pass
        self._forks: dict[int, list[Any]] = {}  # a started job's slot -> the owners of its request's other choices
        self._reserved_ceiling = reserved_ceiling

    @classmethod
    def over(cls, model, cache: PagedKVCache, *, chunk: int | None = None, like: "Batch | None" = None,
             **runner_options) -> "Batch":
        """A batch decoding ``model`` from ``cache`` with eager steps (tests and tools; the engine's
        start-up builds its own with CUDA graphs); ``like``: with that batch's decoder options, so it
        computes the same tokens (a different pool, the same arithmetic)."""
        decoder = Qwen3VLDecoder(model, cache, **(like.runner.decoder.options if like else {}))
        prefiller = Qwen3VLPrefill(model, decoder) if chunk is None else Qwen3VLPrefill(model, decoder, chunk)
        return cls(DecodeRunner(decoder, **runner_options), prefiller)

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the started requests still need computed."""
        return sum(job.remaining for job in self.jobs)

    @property
    def chunk(self) -> int:
        return self.prefiller.chunk

    def start(self, request: GenerationRequest, owner: Any, forks: list[Any] = ()) -> bool:
        """Take a free slot and the blocks for the request's prompt and max_tokens (the leading ones
        shared from the prefix cache where it holds them) and queue its prefill; False (nothing
        taken) when no slot or not enough blocks are free, or while a started prompt is computing
        the blocks it would share (it takes them once they are registered, instead of computing them
        beside it). ``forks``: the owners of the request's other choices, which get slots of their
        own once the prompt is prefilled (held from now). A request for prompt logprobs reads
        nothing from the prefix cache (vLLM's skip_reading_prefix_cache: every position is
        computed); its blocks are registered as any prompt's."""
        prompt, prompt_logprobs = request.prompt, request.params.prompt_logprobs
        shareable = prompt.shareable_hashes if prompt_logprobs is None else []
        if self._prefix_in_progress(shareable):
            return False
        slot = self.cache.allocate(request.reserve, shareable, forks=len(forks), prompt_tokens=prompt.length)
        if slot is None:
            return False
        try:
            job = self.prefiller.job(slot, prompt.input_ids, prompt.mrope_positions, prompt.rope_delta,
                                     prompt.pixel_values, prompt.image_grid_thw, prompt.block_hashes, owner,
                                     prompt_logprobs)
        except BaseException:
            self.cache.free(slot)
            raise
        self._forks[slot] = list(forks)
        self.jobs.append(job)
        return True

    def _prefix_in_progress(self, hashes: list[bytes]) -> bool:
        """Whether a started prompt's prefill will register the first of these blocks (not cached yet)."""
        return bool(hashes) and not self.cache.is_cached(hashes[0]) and \
            any(hashes[0] in job.block_hashes for job in self.jobs)

    @property
    def starting_rows(self) -> int:
        """Rows the started requests will decode (a request of n choices: n). Other threads read it
        (the queue's early check) while the scheduler's changes the jobs: the forks of each started
        job, copied in one step, never iterated while a finishing prefill pops them."""
        return sum(1 + len(forks) for forks in list(self._forks.values()))

    def prefill(self) -> tuple[list[Any], list[torch.Tensor], int, list[PrefillJob | None]]:
        """One prefill pass. Returns the owners of the prompts it finished (now the last rows, in
        order), the logits after each of them (``[vocab]`` each: the caller stacks them among its
        owners' own work, so that an error there fails them alone), the prompt
        tokens they took from the prefix cache and, per owner, its finished job where its request
        asked for prompt logprobs (on its first choice; else None: the caller reads them as the
        owners' own work, which fails them alone). Raises PrefillFailed, its requests dropped."""
        pieces = self.prefiller.plan_pass(self.jobs, self._max_images)
        try:
            self.prefiller.run_pass(pieces)
        except BaseException as exc:
            failed = [job for job, _, _ in pieces]
            for job in failed:
                self._drop_job(job)
            raise PrefillFailed([job.owner for job in failed], exc) from exc
        finally:
            self._trim_allocator()
        done = [job for job in self.jobs if job.finished]
        if not done:
            return [], [], 0, []
        self.jobs = [job for job in self.jobs if not job.finished]
        cached = sum(self.cache.cached_tokens[job.slot] for job in done)
        owners, logits, prompt_logprobs = [], [], []
        for job in done:  # a request's other choices follow it, forked from its prefilled slot
            forks = self._forks.pop(job.slot)
            self.slots += [job.slot] + self.cache.fork(job.slot)
            owners += [job.owner] + forks
            logits += [job.logits] * (1 + len(forks))
            prompt_logprobs += [None if job.prompt_logprobs is None else job] + [None] * len(forks)
        return owners, logits, cached, prompt_logprobs

    def decode(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token per row (host ints, or the previous step's tokens still on the device);
        the next-token logits ``[rows, vocab]``."""
        return self.runner.decode(self.slots, tokens)

    def keep(self, rows: list[int]) -> None:
        """Keep only these decoding rows (in this order); free the others' slots and blocks."""
        kept = [self.slots[i] for i in rows]
        for slot in set(self.slots) - set(kept):
            self.cache.free(slot)
        self.slots = kept

    def drop(self, owners: list[Any]) -> None:
        """Stop the prefill of these started requests and free what they took."""
        for job in [job for job in self.jobs if any(job.owner is owner for owner in owners)]:
            self._drop_job(job)

    def release(self) -> None:
        """Free everything: every row and every started prefill."""
        self.keep([])
        for job in list(self.jobs):
            self._drop_job(job)

    def _drop_job(self, job: PrefillJob) -> None:
        self.jobs.remove(job)
        self._forks.pop(job.slot, None)
        self.cache.free(job.slot)

    def _trim_allocator(self) -> None:
        if self._reserved_ceiling is not None and torch.cuda.memory_reserved(self.cache.device) > self._reserved_ceiling:
            torch.cuda.empty_cache()
