"""The engine API: add_request / step / abort over the scheduler, model runner and sampler.
Single-threaded (async_engine.py runs it in a thread for servers); each step's host bookkeeping overlaps
the next step's GPU work (async scheduling, inflight.py) unless turned off."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwentrt.config import EngineConfig, SamplingParams
from qwentrt.engine import memory_plan
from qwentrt.engine.block_manager import BlockManager
from qwentrt.engine.detokenizer import IncrementalDetokenizer
from qwentrt.engine.prompt_encoder import PromptEncoder
from qwentrt.engine.inflight import InFlightStep
from qwentrt.engine.kernels.w4a16_gemv import reset_split_k_workspaces
from qwentrt.engine.model_runner import ModelRunner
from qwentrt.engine.sampler import Sampler
from qwentrt.engine.scheduler import ScheduledSeq, Scheduler
from qwentrt.engine.sequence import Sequence, Status
from qwentrt.engine.target import check_runs_on
from qwentrt.engine.transfer import HostCopy
from qwentrt.errors import ConfigError

CPU_KV_BUDGET = 256 << 20  # bytes of KV cache on the CPU (the engine's plan is for its GPU)


class RequestError(ValueError):
    """A request that cannot be served as asked: the message names the field and the limit."""


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the last output of this request
    token_ids: list[int]  # new tokens
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    logprobs: list[float] = field(default_factory=list)
    cum_logprob: float = 0.0
    num_cached_tokens: int = 0
    error: str | None = None


class LLMEngine:
    def __init__(self, engine_dir: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, num_blocks: int | None = None, max_num_tokens: int | None = None,
                 max_batch_size: int | None = None, max_prefill_chunk: int | None = None,
                 allow_gpu_mismatch: bool = False, enable_prefix_caching: bool = True, cuda_graphs: bool | None = None,
                 async_scheduling: bool | None = None, prefill_graphs: bool | None = None):
        self.engine_dir = Path(engine_dir)
        self.config = EngineConfig.load(self.engine_dir)
        cfg = self.config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_runs_on(cfg.target, self.device, allow_gpu_mismatch)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_num_tokens = max_num_tokens or cfg.limits.max_num_tokens
        self.max_batch_size = max_batch_size or cfg.limits.max_batch_size
        self.max_seq_len = cfg.limits.max_seq_len
        if num_blocks is None:
            num_blocks = cfg.kv_cache.num_blocks
            if self.device.type == "cpu":
                num_blocks = min(num_blocks, CPU_KV_BUDGET // (cfg.kv_cache.bytes_per_token * cfg.kv_cache.block_size))
        self.runner = ModelRunner(self.engine_dir, cfg, self.device, self.dtype, num_blocks)
        if self.runner.num_blocks == 0:
            raise ConfigError(f"no KV pages fit in the memory free on {self.device}: free GPU memory, or rebuild "
                              "with a smaller --max-num-tokens / --max-batch-size")
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("QWENTRT_CUDA_GRAPHS", "1") != "0"
        if self.device.type == "cuda" and cuda_graphs:
            self.runner.capture_cuda_graphs(self.max_batch_size)
        if prefill_graphs is None:  # a lone prompt's prefill as a graph (prefill_graphs.py); eager on the CPU
            prefill_graphs = self.device.type == "cuda" and cuda_graphs and \
                os.environ.get("QWENTRT_PREFILL_GRAPHS", "1") != "0"
        if prefill_graphs:
            self.runner.capture_prefill_graphs(min(memory_plan.PREFILL_GRAPH_TOKENS, self.max_num_tokens,
                                                   self.max_seq_len))
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.kv_cache.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_num_tokens, self.max_batch_size, max_prefill_chunk)
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(str(self.engine_dir / "tokenizer.json"))
        self.encode_prompt = PromptEncoder(self.tokenizer)
        self._hf_tokenizer = None
        self._guided = None
        self._init_lock = threading.RLock()  # lazy tokenizer / grammar set-up may run on request threads
        self.eos_ids = self._eos_ids()
        self._eos_set = frozenset(self.eos_ids)
        self.sampler = Sampler(self.eos_ids, self.device)
        self._seqs: dict[str, Sequence] = {}
        if async_scheduling is None:
            async_scheduling = os.environ.get("QWENTRT_ASYNC_SCHEDULING", "1") != "0"
        self.async_scheduling = async_scheduling  # overlap a step's bookkeeping with the next step (inflight.py)
        self._inflight: InFlightStep | None = None  # the step launched and not yet processed
        self._ids = itertools.count()
        self.num_step_faults = 0  # steps that failed (their requests ended with finish_reason "error")
        self.num_steps = 0  # steps whose tokens came in
        self.num_generated_tokens = 0  # tokens those steps produced (the engine's own throughput counter)
        self.step_seconds = 0.0  # wall time spent in step()
        self.wait_seconds = 0.0  # of which waiting for the device (a step's tokens): the rest is host work
        # CPU time of the stepping thread in step() outside that wait: below the host wall time, the thread was
        # held up by something other than its own work (another thread holding the GIL, a CPU quota)
        self.host_cpu_seconds = 0.0
        self._wait_cpu = 0.0  # CPU time of this step()'s device waits (reset per step)
        self.consecutive_step_faults = 0  # failed steps since the last good one
        self.last_step_fault: str | None = None

    # ---- tokenizer -------------------------------------------------------------------------------
    @property
    def hf_tokenizer(self):
        with self._init_lock:
            if self._hf_tokenizer is None:
                from transformers import AutoTokenizer
                self._hf_tokenizer = AutoTokenizer.from_pretrained(str(self.engine_dir))
            return self._hf_tokenizer

    def _eos_ids(self) -> list[int]:
        ids = list(self.config.model.eos_token_id)
        gen = self.engine_dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
        return sorted(set(ids))

    def render_chat(self, messages: Any) -> str:
        """Chat messages (a list of {role, content}) through the checkpoint's chat template."""
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
                for m in messages):
            raise RequestError("messages: expected a non-empty list of {\"role\": str, \"content\": str} objects")
        roles = {"system", "user", "assistant", "tool"}
        bad = [m["role"] for m in messages if m["role"] not in roles]
        if bad:
            raise RequestError(f"messages: unknown role {bad[0]!r} (use system, user, assistant, tool)")
        tokenizer = self.hf_tokenizer
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template refuses what the client sent (e.g. malformed tool_calls)
            raise RequestError(f"messages: the chat template cannot render them ({type(e).__name__}: {e})") from None

    @property
    def guided(self):
        with self._init_lock:
            if self._guided is None:
                from qwentrt.engine.guided import GuidedDecoding
                self._guided = GuidedDecoding(self.hf_tokenizer, self.config.model.vocab_size)
                self.sampler.guided = self._guided
            return self._guided

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_ids: list[int] | None = None, messages: list[dict] | None = None) -> Sequence:
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already running")
        return self.add_sequence(self.prepare_request(request_id, prompt, params, prompt_ids, messages))

    def add_sequence(self, seq: Sequence) -> Sequence:
        """Schedule a sequence made by prepare_request (the engine's thread)."""
        if seq.request_id in self._seqs:
            raise RequestError(f"request id {seq.request_id!r} is already running")
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def prepare_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                        prompt_ids: list[int] | None = None, messages: list[dict] | None = None) -> Sequence:
        """Validate, tokenize and build a request's Sequence (its grammar matcher, detokenizer) without
        touching the scheduler: safe from another thread while the engine steps. Raises RequestError."""
        params = params or SamplingParams()
        if sum(x is not None for x in (prompt, prompt_ids, messages)) != 1:
            raise RequestError("give exactly one of text_input (prompt), prompt token ids, or messages")
        try:
            params.validate(self.max_seq_len - 1)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if messages is not None:
            prompt = self.render_chat(messages)
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise RequestError("text_input: the prompt is empty")
            # (long prompts in pieces on several cores; without the GIL, which the engine loop of a server may
            # need meanwhile in another thread of this process)
            prompt_ids = self.encode_prompt(prompt)
        if not prompt_ids:
            raise RequestError("text_input: the prompt is empty")
        vocab = self.config.model.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"input_ids: token ids must be within 0..{vocab - 1}")
        n = len(prompt_ids)
        if n >= self.max_seq_len:
            raise RequestError(f"text_input: the prompt is {n} tokens, over the limit of {self.max_seq_len - 1} "
                               f"(max_seq_len {self.max_seq_len} includes at least one output token)")
        if n + params.max_tokens > self.max_seq_len:
            raise RequestError(f"max_tokens: the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                               f"max_seq_len {self.max_seq_len}")
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if n + params.max_tokens > capacity:
            raise RequestError(f"max_tokens: the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                               f"KV cache capacity of {capacity} tokens")
        seq = Sequence(next(self._ids), request_id, list(prompt_ids), params, arrival=time.monotonic())
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.guide_type is not None:
            from qwentrt.engine.guided import GuideError
            try:
                seq.matcher = self.guided.matcher(params.guide_type, params.guide)
            except GuideError as e:
                raise RequestError(str(e)) from None
        seq.bad_word_ids = [self.tokenizer.encode(w, add_special_tokens=False).ids for w in params.bad_words]
        seq.bad_word_ids = [w for w in seq.bad_word_ids if w]
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                                 skip_special_tokens=params.skip_special_tokens, stop=params.stop)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its KV pages are freed at once. None if it is not (or no longer) running."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self._forget_ended_step()
        return self._output(seq, "", [], [])

    def has_unfinished(self) -> bool:
        """Requests still running, or a step still in flight (step() until False drains it)."""
        return self.scheduler.has_unfinished() or self._inflight is not None

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every unfinished request with finish_reason "error" and `message` (the engine cannot go on)."""
        self._inflight = None  # its tokens are of no use now (and the device may be what failed)
        outputs = []
        for seq in list(self._seqs.values()):
            seq.error = message
            try:
                self.scheduler.finish(seq, "error")
            except Exception:  # the scheduler's state is what failed: end the request anyway
                seq.finish_reason = seq.finish_reason or "error"
            self._seqs.pop(seq.request_id, None)
            outputs.append(self._output(seq, "", [], []))
            outputs[-1].finished, outputs[-1].finish_reason = True, "error"
        return outputs

    # ---- one step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. Synchronous: schedule, run, sample, wait, and return the step's outputs. With
        async scheduling (inflight.py): schedule and launch this step, then wait for the step the previous
        call launched and return its outputs, so that its bookkeeping runs while the GPU runs this one."""
        t_step, cpu_step = time.perf_counter(), time.thread_time()
        self._wait_cpu = 0.0
        try:
            return self._step()
        finally:
            self.step_seconds += time.perf_counter() - t_step
            self.host_cpu_seconds += time.thread_time() - cpu_step - self._wait_cpu

    def _step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        launched = fault = None
        if batch:
            try:
                launched = self._launch(batch)
            except Exception as e:  # a fault in the step fails its requests, not the engine
                fault = e
        outputs = self._drain()  # the step before (if any): its requests' tokens come before this step's fault
        if fault is not None:
            return outputs + self._fail_step([item.seq for item in batch], fault)
        if launched is not None:
            self._inflight = launched
            if launched.sync or not self.async_scheduling:
                outputs += self._drain()
        self._forget_ended_step()
        return outputs

    def _forget_ended_step(self) -> None:
        """Drop the step in flight if all its requests have ended: its results would be discarded, and no
        later step reads its tokens (device and pinned memory are released in stream order)."""
        if self._inflight is not None and all(seq.is_finished for seq in self._inflight.seqs):
            self._inflight = None

    def _launch(self, batch: list[ScheduledSeq]) -> InFlightStep:
        """Queue the step's forward and sampling on the device and account for it on the host (computed
        tokens, tokens in flight); nothing here waits for the device (but penalties and grammar masks,
        whose steps are synchronous anyway)."""
        prev = self._inflight
        logits, sampling = self.runner.run(batch, self.block_manager, prev.tokens if prev is not None else None)
        tokens, logprobs = self.sampler.sample(logits, sampling)
        copy = HostCopy([tokens] if logprobs is None else [tokens, logprobs])
        bm = self.block_manager
        for item in batch:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            # Pages filled with known tokens are hashed now (prefix caching), as the synchronous engine does
            # after the step; a page whose last token is in flight, once that token is known (_process).
            # (Later steps that read these pages are queued after this one.)
            bm.mark_computed(seq.seq_id, seq.token_ids, min(seq.num_computed_tokens, len(seq.token_ids)))
        for row, seq in enumerate(sampling):
            seq.num_pending += 1
            seq.pending_row = row
        return InFlightStep([item.seq for item in batch], sampling, tokens, copy,
                            any(s.needs_host_tokens for s in sampling))

    def _drain(self) -> list[RequestOutput]:
        """Wait for the step in flight (if any) and return its outputs."""
        step, self._inflight = self._inflight, None
        if step is None:
            return []
        t_wait, cpu_wait = time.perf_counter(), time.thread_time()
        try:
            tokens, logprobs = step.result()
        except Exception as e:  # the device failed the step
            self.wait_seconds += time.perf_counter() - t_wait
            self._wait_cpu += time.thread_time() - cpu_wait
            outputs = self._fail_step(step.seqs, e)
            self.block_manager.reset_prefix_cache()  # its pages were hashed at launch: their KV is unknown
            return outputs
        self.wait_seconds += time.perf_counter() - t_wait
        self._wait_cpu += time.thread_time() - cpu_wait  # (a device wait may spin on the CPU)
        self.consecutive_step_faults = 0  # (a step is good once its tokens are in: a launch may fail later)
        return self._process(step, tokens, logprobs)

    def _process(self, step: InFlightStep, tokens: list[int], logprobs: list[float] | None) -> list[RequestOutput]:
        bm = self.block_manager
        tokens, logprobs = self.sampler.to_host(tokens, logprobs, step.sampling)
        self.num_steps += 1
        self.num_generated_tokens += len(step.sampling)
        outputs = []
        for seq, token, lp in zip(step.sampling, tokens, logprobs):
            seq.num_pending -= 1
            if seq.is_finished:  # it ended (a stop, an abort) after this step was launched: not its token
                continue
            out = self._advance(seq, token, lp)
            if seq.status is Status.RUNNING:  # the token is known: its page can be hashed
                bm.mark_computed(seq.seq_id, seq.token_ids, min(seq.num_computed_tokens, len(seq.token_ids)))
            outputs.append(out)
        return outputs

    def _fail_step(self, seqs: list[Sequence], fault: BaseException) -> list[RequestOutput]:
        """A step failed: its requests (those not ended yet) end with finish_reason "error"."""
        self.num_step_faults += 1
        self.consecutive_step_faults += 1
        self.last_step_fault = f"{type(fault).__name__}: {fault}"
        reset_split_k_workspaces()  # (a step stopped part-way may leave a GEMV's sums behind for the next one)
        outputs = []
        for seq in seqs:
            if not seq.is_finished:
                seq.error = self.last_step_fault
                outputs.append(self._finish(seq, "error", ""))
        return outputs

    def _advance(self, seq: Sequence, token: int, logprob: float) -> RequestOutput:
        p = seq.params
        seq.output_ids.append(token)
        seq.token_ids.append(token)
        seq.cum_logprob += logprob
        if seq.matcher is not None and not seq.matcher.is_terminated():
            seq.matcher.accept_token(token)
        is_eos = token in self._eos_set and not p.ignore_eos
        detokenizer = seq.detokenizer
        text = "" if is_eos else detokenizer.add([token])
        num_out = len(seq.output_ids)
        reason = None
        if (is_eos or token in p.stop_token_ids) and num_out > p.min_tokens - 1:
            reason = "stop"
        elif detokenizer.stopped is not None:
            reason = "stop"
        elif num_out >= p.max_tokens or len(seq.token_ids) >= self.max_seq_len:
            reason = "length"
        if reason is None:  # (an unfinished request's output, built directly: this runs per token)
            return RequestOutput(seq.request_id, text, [token], len(seq.prompt_ids), num_out, False, None, [logprob],
                                 seq.cum_logprob, seq.num_cached_tokens, seq.error)
        return self._finish(seq, reason, text, [token], [logprob])

    def _finish(self, seq: Sequence, reason: str, text: str, tokens: list[int] = (), logprobs: list[float] = ()
                ) -> RequestOutput:
        if reason in ("stop", "length") and seq.detokenizer.stopped is None:
            text += seq.detokenizer.finish()
        self.scheduler.finish(seq, reason)
        self._seqs.pop(seq.request_id, None)
        return self._output(seq, text, list(tokens), list(logprobs))

    def _output(self, seq: Sequence, text: str, tokens: list[int], logprobs: list[float]) -> RequestOutput:
        return RequestOutput(seq.request_id, text, tokens, seq.num_prompt_tokens, seq.num_output_tokens,
                             seq.is_finished, seq.finish_reason if seq.is_finished else None, logprobs,
                             seq.cum_logprob, seq.num_cached_tokens, seq.error)

    # ---- helpers ---------------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[RequestOutput]:
        """Run prompts to completion (all admitted at once); one summary output per prompt, in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for p, sp in zip(prompts, params_list):
            rid = f"gen-{next(self._ids)}"
            ids.append(rid)
            if isinstance(p, str):
                self.add_request(rid, p, sp)
            else:
                self.add_request(rid, params=sp, prompt_ids=list(p))
        return self.run_to_completion(ids)

    def run_to_completion(self, request_ids: list[str]) -> list[RequestOutput]:
        acc: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                prev = acc.get(out.request_id)
                if prev is not None:
                    out.text = prev.text + out.text
                    out.token_ids = prev.token_ids + out.token_ids
                    out.logprobs = prev.logprobs + out.logprobs
                acc[out.request_id] = out
        return [acc[r] for r in request_ids]

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_pages_used": bm.num_used_blocks, "kv_pages_free": bm.num_free_blocks,
                "prefix_cache_hit_tokens": bm.prefix_cache_hit_tokens,
                "prefix_cache_query_tokens": bm.prefix_cache_query_tokens,
                "preemptions": self.scheduler.num_preemptions, "step_faults": self.num_step_faults,
                "engine_steps": self.num_steps, "engine_tokens": self.num_generated_tokens,
                "engine_step_seconds": self.step_seconds, "engine_wait_seconds": self.wait_seconds,
                "engine_host_cpu_seconds": self.host_cpu_seconds}
