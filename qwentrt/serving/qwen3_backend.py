"""What the Triton `qwen3` model (Python backend, decoupled) runs: the engine loop (in a thread, or in its
own process), requests
parsed and submitted as they arrive, and a sender thread that turns engine outputs into responses.

The sender coalesces: when a stream produces tokens faster than responses can be sent (a decoupled
Python-backend response costs ~0.1-0.3 ms), one response carries every token produced since the
previous one. Cancelled requests are aborted (their KV pages freed) within ~0.1 s (is_cancelled() is asked
every 50 ms, of up to `cancel_polls_per_s` x 50 ms streams a round: past 100 streams they take turns, so at 512
streams within ~0.3 s). With `engine_process` (qwentrt/serving/engine_process.py) the engine loop runs in its own
process, so that the sender's Python never holds the GIL the loop needs.

Faults: a failed engine step ends the requests in it with INTERNAL (counted in qwentrt_step_faults_total);
when the engine cannot go on (its loop failed, or `max_consecutive_step_faults` steps failed in a row)
every request in flight gets a final error, new ones get UNAVAILABLE, qwentrt_engine_healthy drops to 0
and, with `engine_failure: shutdown` (the default), the model asks tritonserver to shut down so that its
readiness says the truth and a supervisor can restart it. At shutdown, requests still running after
Triton's drain get a final UNAVAILABLE response: every accepted request gets a final response."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwentrt.engine.async_engine import AsyncEngine, EngineUnavailable
from qwentrt.engine.engine import LLMEngine, RequestError, RequestOutput
from qwentrt.serving import engine_process, faults, memtrace
from qwentrt.serving.lifecycle import ServerWatch, exit_with_parent, stacks_later
from qwentrt.serving.request import BadRequest, ParsedRequest, parse

_ZERO = np.zeros((1, 1), dtype=np.int32)  # batch_index and sequence_index of every response
STOP_STACKS_AFTER_S = 6  # a stop still running after this long writes every thread's stack to the log
POLL_S = 0.05  # how often the sender asks Triton whether streams were cancelled (a budget a round: see below)
OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens", "finish_reason", "cum_log_probs",
           "output_log_probs", "batch_index", "sequence_index", "json_valid", "json_errors")


@dataclass
class Stream:
    request_id: str
    sender: Any
    parsed: ParsedRequest
    prompt_text: str
    pending: list[RequestOutput] = field(default_factory=list)
    text: str = ""  # all text so far (non-streamed requests send it at the end)
    logprobs: list[float] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: int = 0
    last_token: float | None = None
    last_sent: float = 0.0  # when the sender last sent (or consumed) this stream's outputs


class Qwen3Backend:
    def __init__(self, params: dict[str, str], pb_utils: Any, model_name: str = "qwen3", python: str | None = None):
        """python: the interpreter for the engine process (qwentrt_env.json's, written by `qwentrt repo`)."""
        self.pb = pb_utils
        # A Python-backend response costs ~0.1-0.3 ms of this process's time (and its GIL, which the engine
        # loop needs too when it runs here): past this rate, streams are paced and each response carries
        # several tokens.
        self.max_responses_per_s = _positive(params, "max_responses_per_s", 1500)  # checked before loading
        # is_cancelled() is a round trip to Triton (~0.1 ms of the sender's time): polling every stream every
        # POLL_S made the sender poll ~10,000 times a second at 512 streams; past this budget each stream is
        # polled less often (round robin), so cancellation is noticed within max(POLL_S, streams / budget).
        self.cancel_polls_per_s = _positive(params, "cancel_polls_per_s", 2000)
        self.on_engine_failure = params.get("engine_failure", "shutdown")
        if self.on_engine_failure not in ("shutdown", "reject"):
            raise ValueError(f"engine_failure: {self.on_engine_failure!r} is not shutdown or reject")
        # The engine loop in its own process (engine_process.py: its GIL is not the sender's) or in a thread here
        self.engine_process = engine_process.wanted(params.get("engine_process"), params.get("device"))
        fault_spec = os.environ.get(faults.ENV) or params.get("fault_inject")
        if fault_spec:
            faults.parse(fault_spec)  # a bad rule is refused here, before the engine loads
            print(f"qwentrt: WARNING: fault injection is on ({fault_spec}): for tests only", file=sys.stderr)
        self.engine: LLMEngine | None = None  # only when the engine runs in this process
        if self.engine_process:
            self.service = engine_process.EngineClient(params, python=python)
            print(f"qwentrt: the engine runs in its own process (pid {self.service.pid})", file=sys.stderr, flush=True)
            self.max_seq_len, max_batch_size = self.service.max_seq_len, self.service.max_batch_size
        else:
            optional_int = lambda key: int(params[key]) if params.get(key) else None  # noqa: E731
            self.engine = LLMEngine(params["engine_dir"], device=params.get("device") or None,
                                    allow_gpu_mismatch=params.get("allow_gpu_mismatch", "false") == "true",
                                    num_blocks=optional_int("num_kv_blocks"),
                                    max_batch_size=optional_int("max_batch_size"))
            if fault_spec:
                faults.install(self.engine, fault_spec)
            self.service = AsyncEngine(self.engine, int(params.get("max_consecutive_step_faults", 3)))
            self.max_seq_len, max_batch_size = self.engine.max_seq_len, self.engine.max_batch_size
        self.max_queue = int(params.get("max_queue_size", 4 * max_batch_size))
        self.validator = params.get("json_validator_model", "json_validator")
        self._engine_down_seen = False
        self._closing = False
        self._drain_deadline: float | None = None
        self.drain_s = float(params.get("shutdown_drain_s", 20))
        self._next_due: float | None = None
        self._next_poll = 0.0  # when the sender next asks every stream whether it was cancelled
        self._poll_cursor = 0  # round robin over the streams when they are more than a poll round's budget
        self._tokens_out = 0  # generated tokens sent since the counter was last updated (once per pass)
        self.watch = ServerWatch.of_parent()
        self._step_faults_seen = 0
        self._counts_seen: dict[str, float] = {}  # the engine counters last exported (_Metrics.counters)
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._stop = False
        self.metrics = _Metrics(pb_utils, model_name)
        self._sender = threading.Thread(target=self._send_loop, name="qwentrt-sender", daemon=True)
        self._sender.start()
        exit_with_parent()  # an orphan stub (tritonserver killed) would keep the engine's memory
        if self.watch is not None and self.watch.ready_url is not None:
            threading.Thread(target=self._watch_server, name="qwentrt-watch", daemon=True).start()
        memtrace.start_from_env(self.memory_state)  # QWENTRT_MEMTRACE=<dir>: diagnostics only

    def memory_state(self) -> dict[str, int]:
        """Sizes of the per-request state (all 0 when idle, but the prefix cache, bounded by the KV pages)."""
        if self.engine is None:  # the engine process's sizes, as of its last report (every 0.1 s)
            return {"streams": len(self._streams), **self.service.memory_state()}
        e, bm = self.engine, self.engine.block_manager
        return {"streams": len(self._streams), "engine_callbacks": len(self.service._streams),
                "engine_seqs": len(e._seqs), "waiting": len(e.scheduler.waiting), "running": len(e.scheduler.running),
                "kv_seqs": len(bm._seqs), "prefix_cache_pages": len(bm._hash_to_block), "kv_pages": bm.num_blocks}

    # ---- requests in -----------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                if not self.service.healthy:
                    raise EngineUnavailable(self.service.dead or "the engine thread has stopped")
                if self._closing:
                    self._reject(sender, "the server is shutting down; retry on a running server",
                                 pb.TritonError.UNAVAILABLE)
                    continue
                inputs = {t.name(): t.as_numpy() for t in request.inputs()}
                parsed = parse(inputs, self.max_seq_len - 1, _request_parameters(request))
                if self.service.num_waiting >= self.max_queue:  # no lock: refuse at once
                    self._reject(sender, f"server busy: {self.max_queue} requests already queued; retry later",
                                 pb.TritonError.UNAVAILABLE)
                    continue
                rid = f"{request.request_id() or 'req'}#{next(self._ids)}"
                stream = Stream(rid, sender, parsed, parsed.prompt or "")
                with self._lock:
                    self._streams[rid] = stream
                try:
                    self.service.add(rid, lambda out, s=stream: self._on_output(s, out), parsed.prompt, parsed.params,
                                     messages=parsed.messages)
                except BaseException:
                    with self._lock:
                        self._streams.pop(rid, None)
                    raise
                self.metrics.requests.increment(1)
            except (BadRequest, RequestError) as e:
                self._reject(sender, str(e), pb.TritonError.INVALID_ARG)
            except EngineUnavailable as e:
                self._reject(sender, f"the engine has stopped ({e}); the server needs a restart",
                             pb.TritonError.UNAVAILABLE)
            except Exception as e:  # never let one request take the model down
                self._reject(sender, f"{type(e).__name__}: {e}", pb.TritonError.INTERNAL)
        return None

    def _reject(self, sender: Any, message: str, code: int, count: bool = True) -> None:
        """A final error response. gRPC streams carry only the message, so it starts with the code."""
        if count:
            self.metrics.rejected.increment(1)
        sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(f"[{self._code_name(code)}] {message}", code)),
                    flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _code_name(self, code: int) -> str:
        E = self.pb.TritonError
        return {E.INVALID_ARG: "INVALID_ARG", E.UNAVAILABLE: "UNAVAILABLE", E.INTERNAL: "INTERNAL"}.get(code, "ERROR")

    def _on_output(self, stream: Stream, out: RequestOutput) -> None:  # engine thread
        with self._lock:
            stream.pending.append(out)
        self._wake.set()

    # ---- responses out ---------------------------------------------------------------------------
    def _send_loop(self) -> None:
        last_gauges = 0.0
        while not self._stop:
            due = self._next_due
            self._wake.wait(timeout=0.05 if due is None else min(0.05, max(0.0, due - time.monotonic())))
            self._wake.clear()
            try:
                self._send_pass()
                last_gauges = self._gauges(last_gauges)
                self._watch_engine()
                if self._drain_deadline is not None and (time.monotonic() > self._drain_deadline or not self._streams):
                    self._drain_deadline = None
                    self._end_remaining("the server is shutting down")
            except Exception as e:  # the sender must outlive any one failure
                print(f"qwentrt: sender pass failed: {type(e).__name__}: {e}", file=sys.stderr)

    def _send_pass(self) -> None:
        now = time.monotonic()
        with self._lock:
            # Each stream gets at most one response per `interval`: its first token and its end go at once,
            # what comes in between waits and is sent together (coalescing under load).
            interval = len(self._streams) / self.max_responses_per_s
            ready, next_due = [], None
            for s in self._streams.values():
                if not s.pending:
                    continue
                due = s.last_sent + interval
                if (s.parsed.stream and s.first_token is not None and now < due
                        and not any(o.finished for o in s.pending)):
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                ready.append((s, s.pending))
                s.pending = []
                s.last_sent = now
            self._next_due = next_due
            live = list(self._streams.values())
        for stream, outputs in ready:
            try:
                self._send(stream, outputs)
            except Exception as e:  # the client is gone (cancelled, disconnected): stop its request
                print(f"qwentrt: dropping {stream.request_id}: {type(e).__name__}: {e}", file=sys.stderr)
                self._cancel(stream)
        if self._tokens_out:
            self.metrics.tokens_out.increment(self._tokens_out)  # (a metric update is a round trip to Triton)
            self._tokens_out = 0
        # is_cancelled() is a round trip to Triton per stream: every POLL_S, not every pass (one per step), and
        # at most cancel_polls_per_s * POLL_S streams a round, taking turns (the round robin continues from
        # the stream after the last one polled)
        if now >= self._next_poll:
            self._next_poll = now + POLL_S
            for stream in self._poll_round(live):
                if stream.request_id in self._streams and stream.sender.is_cancelled():
                    self._cancel(stream)

    def _poll_round(self, live: list[Stream]) -> list[Stream]:
        """The streams to ask is_cancelled() this round: all of them when they fit the budget, else the next
        `budget` after the one asked last (streams keep their arrival order in self._streams)."""
        budget = max(1, int(self.cancel_polls_per_s * POLL_S))
        if len(live) <= budget:
            return live
        start = self._poll_cursor % len(live)
        self._poll_cursor = start + budget
        return (live + live)[start:start + budget]

    def _cancel(self, stream: Stream) -> None:
        """Abort the engine request (its KV pages are freed now) and release the Triton request."""
        self.service.abort(stream.request_id)
        self._drop(stream)
        self.metrics.cancelled.increment(1)

    def _gauges(self, last_gauges: float) -> float:
        now = time.monotonic()
        if now - last_gauges > 0.2:
            stats = self.service.stats()
            self.metrics.update(stats)
            faults_now = stats.get("step_faults", 0)
            self.metrics.step_faults.increment(faults_now - self._step_faults_seen)
            self._step_faults_seen = faults_now
            for key, counter in self.metrics.counters.items():
                now_count = stats.get(key, 0)
                if now_count > self._counts_seen.get(key, 0):
                    counter.increment(now_count - self._counts_seen.get(key, 0))
                    self._counts_seen[key] = now_count
            last_gauges = now
        return last_gauges

    def _watch_engine(self) -> None:
        """Once the engine has stopped for good: say so, and (engine_failure: shutdown) stop tritonserver."""
        if self._engine_down_seen or self.service.healthy or self._stop:
            return
        self._engine_down_seen = True
        why = self.service.dead or "the engine thread has stopped"
        self.metrics.healthy.set(0)
        print(f"qwentrt: the engine cannot go on: {why}", file=sys.stderr)
        if self.on_engine_failure == "shutdown":
            _stop_tritonserver(why)

    def _drop(self, stream: Stream) -> None:
        with self._lock:
            self._streams.pop(stream.request_id, None)
        try:
            stream.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:
            pass

    def _send(self, stream: Stream, outputs: list[RequestOutput]) -> None:
        pb = self.pb
        last = outputs[-1]
        delta = "".join(o.text for o in outputs)
        new_tokens = sum(len(o.token_ids) for o in outputs)
        now = time.monotonic()
        if new_tokens:
            if stream.first_token is None:
                stream.first_token = now
                self.metrics.ttft.observe(now - stream.arrival)
            elif stream.last_token is not None:
                self.metrics.itl.observe((now - stream.last_token) / new_tokens)
            stream.last_token = now
        self._tokens_out += new_tokens
        stream.tokens += new_tokens
        stream.text += delta
        for o in outputs:
            stream.logprobs.extend(o.logprobs)
        if last.finished:
            with self._lock:
                self._streams.pop(stream.request_id, None)
            self.metrics.tokens_in.increment(last.num_prompt_tokens)
            if last.finish_reason == "error":
                self.metrics.failed.increment(1)
                stream.sender.send(pb.InferenceResponse(error=pb.TritonError(
                    f"[INTERNAL] generation failed: {last.error}", pb.TritonError.INTERNAL)),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
        if stream.parsed.stream:
            text = delta
        elif last.finished:
            text = stream.text if stream.parsed.exclude_input_in_output else stream.prompt_text + stream.text
        else:
            return  # non-streamed: one response at the end
        valid, errors = None, ""
        if last.finished and stream.parsed.schema is not None:
            valid, errors = self._validate(stream.text, stream.parsed.schema)
        response = pb.InferenceResponse(output_tensors=self._tensors(stream, text, last, valid, errors))
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last.finished else 0
        stream.sender.send(response, flags=flags)

    def _tensors(self, stream: Stream, text: str, out: RequestOutput, valid: bool | None, errors: str) -> list:
        T = self.pb.Tensor
        logprobs = stream.logprobs if out.finished or not stream.parsed.stream else out.logprobs
        tensors = [
            T("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            T("num_input_tokens", np.array([[out.num_prompt_tokens]], dtype=np.int32)),
            T("num_output_tokens", np.array([[out.num_output_tokens]], dtype=np.int32)),
            T("finish_reason", np.array([[(out.finish_reason or "").encode()]], dtype=np.object_)),
            T("cum_log_probs", np.array([[out.cum_logprob]], dtype=np.float32)),
            T("output_log_probs", np.array([logprobs or [0.0]], dtype=np.float32)),
            T("batch_index", _ZERO),
            T("sequence_index", _ZERO),
        ]
        if valid is not None:
            tensors += [T("json_valid", np.array([[valid]], dtype=np.bool_)),
                        T("json_errors", np.array([[errors.encode("utf-8")]], dtype=np.object_))]
        return tensors

    def _validate(self, text: str, schema: str) -> tuple[bool, str]:
        """Ask the json_validator model (BLS) whether the final text satisfies the schema."""
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=self.validator, requested_output_names=["valid", "errors"],
            inputs=[pb.Tensor("text", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                    pb.Tensor("schema", np.array([[schema.encode("utf-8")]], dtype=np.object_))])
        response = request.exec()
        if response.has_error():
            return False, f"validator failed: {response.error().message()}"
        valid = bool(pb.get_output_tensor_by_name(response, "valid").as_numpy().reshape(-1)[0])
        errors = pb.get_output_tensor_by_name(response, "errors").as_numpy().reshape(-1)[0]
        return valid, errors.decode("utf-8") if isinstance(errors, bytes) else str(errors)

    # ---- shutdown ---------------------------------------------------------------------------------
    def _watch_server(self) -> None:
        """Drain once tritonserver, after having been ready, says it is not (it is shutting down)."""
        seen_ready = False
        while not self._stop:
            time.sleep(0.25)
            ready = self.watch.ready()
            if ready:
                seen_ready = True
            elif ready is False and seen_ready and not self._closing:
                self.begin_drain("tritonserver is shutting down")

    def begin_drain(self, why: str) -> None:
        """Refuse new requests; let those running finish for a bounded time (then they get UNAVAILABLE)."""
        budget = min(self.drain_s, max(1.0, self.watch.exit_timeout_s - 5)) if self.watch else self.drain_s
        self._drain_deadline = time.monotonic() + budget
        self._closing = True
        with self._lock:
            running = len(self._streams)
        print(f"qwentrt: {why}: draining {running} request(s) for up to {budget:.0f} s", file=sys.stderr, flush=True)
        self._wake.set()

    def _end_remaining(self, message: str) -> None:
        """A final UNAVAILABLE response for every request still running (its engine request aborted)."""
        with self._lock:
            live = list(self._streams.values())
            self._streams.clear()
        for stream in live:
            self.service.abort(stream.request_id)
            try:
                self._reject(stream.sender, f"{message}: the request stopped after {stream.tokens} tokens; retry on "
                             "a running server", self.pb.TritonError.UNAVAILABLE, count=False)
            except Exception as e:
                print(f"qwentrt: could not end {stream.request_id}: {type(e).__name__}: {e}", file=sys.stderr)
        if live:
            print(f"qwentrt: ended {len(live)} request(s) still running: {message}", file=sys.stderr, flush=True)

    def shutdown(self) -> None:
        """Triton's finalize: by now the drain has normally ended every request; end any left, stop."""
        self._closing = True
        self._stop = True
        self._wake.set()
        t0 = time.monotonic()
        # a stop that hangs (tritonserver's exit timeout then ends the process) leaves every thread's stack in the log
        stacks_later(STOP_STACKS_AFTER_S)
        self._sender.join(timeout=5)
        try:
            self._send_pass()
        except Exception as e:
            print(f"qwentrt: last sender pass failed: {type(e).__name__}: {e}", file=sys.stderr)
        self._end_remaining("the server is shutting down")
        t1 = time.monotonic()
        if t1 - t0 > 2:  # (tritonserver's exit timeout counts this: say where it went, now, in case it runs out)
            print(f"qwentrt: the model's sender took {t1 - t0:.1f} s to stop", file=sys.stderr, flush=True)
        self.service.shutdown()
        stacks_later(None)
        t2 = time.monotonic()
        if t2 - t0 > 2:
            print(f"qwentrt: the model took {t2 - t0:.1f} s to stop: {t1 - t0:.1f} s for the sender's last "
                  f"responses, {t2 - t1:.1f} s for the engine", file=sys.stderr, flush=True)


class _Metrics:
    """Custom Prometheus metrics on Triton's metrics port (nv_... are Triton's own)."""

    TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
    ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]

    def __init__(self, pb: Any, model: str):
        fam = pb.MetricFamily
        labels = {"model": model}
        self._families = []  # a MetricFamily must outlive its metrics

        def metric(name: str, desc: str, kind, **kw):
            family = fam(name=name, description=desc, kind=kind)
            self._families.append(family)
            return family.Metric(labels=labels, **kw)

        self.requests = metric("qwentrt_requests_total", "Requests accepted", fam.COUNTER)
        self.rejected = metric("qwentrt_requests_rejected_total", "Requests refused (bad input, overload)", fam.COUNTER)
        self.cancelled = metric("qwentrt_requests_cancelled_total", "Requests cancelled by their client", fam.COUNTER)
        self.tokens_in = metric("qwentrt_prompt_tokens_total", "Prompt tokens of finished requests", fam.COUNTER)
        self.tokens_out = metric("qwentrt_generated_tokens_total", "Generated tokens", fam.COUNTER)
        self.failed = metric("qwentrt_requests_failed_total", "Accepted requests ended by a server fault (INTERNAL)",
                             fam.COUNTER)
        self.step_faults = metric("qwentrt_step_faults_total", "Engine steps that failed (their requests failed)",
                                  fam.COUNTER)
        # The engine's own counts (ahead of the responses when the sender lags): with qwentrt_generated_tokens_total
        # they tell an engine-bound server from a response-bound one
        self.counters = {k: metric(f"qwentrt_{k}_total", desc, fam.COUNTER) for k, desc in {
            "engine_steps": "Engine steps whose tokens came in",
            "engine_tokens": "Tokens the engine generated (sent or not yet)",
            "engine_step_seconds": "Seconds the engine spent in its steps",
            "engine_wait_seconds": "Seconds of those the engine waited for the device",
            "engine_host_cpu_seconds": "CPU seconds the engine's thread used in its steps outside that wait"}.items()}
        self.healthy = metric("qwentrt_engine_healthy", "1 while the engine runs, 0 once it has stopped for good",
                              fam.GAUGE)
        self.healthy.set(1)
        self.gauges = {k: metric(f"qwentrt_{k}", desc, fam.GAUGE) for k, desc in {
            "running": "Requests running", "waiting": "Requests waiting", "kv_pages_used": "KV pages in use",
            "kv_pages_free": "KV pages free", "prefix_cache_hit_tokens": "Prompt tokens served from the prefix cache",
            "preemptions": "Requests preempted so far"}.items()}
        histogram = getattr(fam, "HISTOGRAM", None)
        if histogram is not None:
            self.ttft = metric("qwentrt_time_to_first_token_seconds", "Time to first token", histogram,
                               buckets=self.TTFT_BUCKETS)
            self.itl = metric("qwentrt_inter_token_latency_seconds", "Time between tokens", histogram,
                              buckets=self.ITL_BUCKETS)
        else:  # older Python backends: keep the interface, drop the samples
            self.ttft = self.itl = _NoHistogram()

    def update(self, stats: dict[str, int]) -> None:
        for key, gauge in self.gauges.items():
            gauge.set(stats.get(key, 0))


def _request_parameters(request: Any) -> dict[str, Any]:
    """The request's parameters map (Triton hands it to the model as JSON)."""
    get = getattr(request, "parameters", None)
    raw = get() if get is not None else None
    return json.loads(raw) if raw else {}


def _stop_tritonserver(why: str) -> None:
    """Ask the tritonserver running this model to shut down (it drains, then exits): its readiness turns
    false at once. Only when the parent process is tritonserver (the Python backend's stub)."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/comm", encoding="utf-8") as f:
            parent = f.read().strip()
    except OSError:
        parent = ""
    if not parent.startswith("tritonserver"):
        print(f"qwentrt: not stopping the parent process ({parent or ppid!r} is not tritonserver)", file=sys.stderr)
        return
    print(f"qwentrt: stopping tritonserver (pid {ppid}): {why}", file=sys.stderr)
    os.kill(ppid, signal.SIGTERM)


class _NoHistogram:
    def observe(self, value: float) -> None:
        pass


def _positive(params: dict[str, str], key: str, default: float) -> float:
    """A positive number from the model's config.pbtxt parameters, or a ValueError naming it."""
    raw = params.get(key) or default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"config.pbtxt parameter {key}: expected a positive number, got {raw!r}")
    return value
