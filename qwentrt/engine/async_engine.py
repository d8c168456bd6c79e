"""The engine loop in a background thread, for servers: `generate()` is an async iterator of text
deltas; leaving it early (cancel, disconnect) aborts the request and frees its KV pages. `add()`
takes a callback instead, called on the engine thread (the Triton model uses that)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from typing import AsyncIterator, Callable

from qwentrt.config import SamplingParams
from qwentrt.engine.engine import LLMEngine, RequestError, RequestOutput


class EngineUnavailable(RuntimeError):
    """The engine has stopped for good (its loop failed, or too many steps failed in a row)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_consecutive_faults: int = 3,
                 after_outputs: Callable[[], None] | None = None):
        self.engine = engine
        # called on the engine thread after each step's outputs have been delivered (and after the final
        # outputs when the engine stops for good): engine_process.py sends a step's outputs as one message
        self.after_outputs = after_outputs
        self.max_consecutive_faults = max_consecutive_faults
        self.dead: str | None = None  # why the engine stopped for good
        # The loop holds _lock during each step. Other threads never wait for it: adds and aborts are queued
        # and applied by the loop before its next step; stats are read without it.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, Callable[[RequestOutput], None]] = {}
        self._aborts: collections.deque[str] = collections.deque()  # applied by the loop before its next step
        self._adds: collections.deque = collections.deque()  # prepared sequences the loop schedules next
        self._ids = itertools.count()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="qwentrt-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                refused = []
                with self._lock:
                    while self._adds:
                        seq = self._adds.popleft()
                        try:
                            self.engine.add_sequence(seq)
                        except RequestError as e:  # the same id added twice at once: refuse the second
                            refused.append(RequestOutput(seq.request_id, "", [], seq.num_prompt_tokens, 0, True,
                                                         "error", error=str(e)))
                    while self._aborts:
                        self.engine.abort(self._aborts.popleft())
                    busy = self.engine.has_unfinished()
                    outputs = self.engine.step() if busy else []
            except Exception as e:  # outside the step's own fault handling: the engine's state is unknown
                return self._fail(f"the engine loop failed: {type(e).__name__}: {e}")
            for out in refused + outputs:
                self._deliver(out)
            if self.after_outputs is not None and (refused or outputs):
                self.after_outputs()
            if self.engine.consecutive_step_faults >= self.max_consecutive_faults:
                return self._fail(f"{self.engine.consecutive_step_faults} engine steps failed in a row "
                                  f"(last: {self.engine.last_step_fault})")
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _fail(self, why: str) -> None:
        """Stop for good: every unfinished request ends with an error, new ones get EngineUnavailable."""
        with self._lock:
            self.dead = why
            try:
                outputs = self.engine.fail_all(why)
            except Exception:
                outputs = []
            ended = {o.request_id for o in outputs}  # whatever fail_all missed still gets its final output
            outputs += [RequestOutput(rid, "", [], 0, 0, True, "error", error=why)
                        for rid in list(self._streams) if rid not in ended]
        for out in outputs:
            self._deliver(out)
        if self.after_outputs is not None:
            self.after_outputs()

    @property
    def healthy(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def _deliver(self, out: RequestOutput) -> None:
        callback = self._streams.get(out.request_id)
        if callback is None:
            return
        if out.finished:
            self._streams.pop(out.request_id, None)
        try:
            callback(out)
        except Exception:  # a consumer's fault must not stop the engine loop
            self.abort(out.request_id)

    def add(self, request_id: str, on_output: Callable[[RequestOutput], None], prompt: str | None = None,
            params: SamplingParams | None = None, messages: list[dict] | None = None,
            prompt_ids: list[int] | None = None) -> None:
        """Add a request whose outputs go to `on_output` (called on the engine thread; keep it short).
        Raises RequestError at once for bad input, EngineUnavailable once the engine has stopped."""
        if not self.healthy:
            raise EngineUnavailable(self.dead or "the engine thread has stopped")
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already running")
        # Validation, tokenization and grammar set-up run here, on the caller's thread, while the engine
        # steps; the loop only schedules the sequence before its next step (never waits for a step).
        seq = self.engine.prepare_request(request_id, prompt, params, prompt_ids=prompt_ids, messages=messages)
        self._streams[request_id] = on_output
        self._adds.append(seq)
        self._wake.set()
        if not self.healthy and self._streams.pop(request_id, None) is not None:  # the loop died meanwhile
            raise EngineUnavailable(self.dead or "the engine thread has stopped")

    def submit(self, request_id: str | None = None, prompt: str | None = None,
               params: SamplingParams | None = None, messages: list[dict] | None = None,
               prompt_ids: list[int] | None = None) -> tuple[str, asyncio.Queue]:
        """Add a request (raises RequestError at once for bad input) and get its output queue."""
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.add(request_id, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out), prompt, params,
                 messages, prompt_ids)
        return request_id, queue

    def abort(self, request_id: str) -> None:
        """Stop a request: no output from now on; its KV pages are freed before the next step. Never waits
        for the step running now, so that hundreds of cancellations cost one step, not one step each."""
        self._streams.pop(request_id, None)
        self._aborts.append(request_id)
        self._wake.set()

    async def generate(self, prompt: str | None = None, params: SamplingParams | None = None,
                       messages: list[dict] | None = None, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        request_id, queue = self.submit(request_id, prompt, params, messages)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the scheduler's queue and those queued for the next step."""
        return len(self.engine.scheduler.waiting) + len(self._adds)

    def stats(self) -> dict[str, int]:
        """The engine's counters, read without waiting for the step running now (a snapshot that may be
        one step old: for metrics, not for decisions); requests queued for the next step count as waiting."""
        stats = self.engine.stats()
        stats["waiting"] += len(self._adds)
        return stats

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
