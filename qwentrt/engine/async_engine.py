"""The engine loop in a background thread, for servers: `generate()` is an async iterator of text
deltas; leaving it early (cancel, disconnect) aborts the request and frees its KV pages. `add()`
takes a callback instead, called on the engine thread (the Triton model uses that)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import AsyncIterator, Callable

from qwentrt.config import SamplingParams
from qwentrt.engine.engine import LLMEngine, RequestOutput


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, Callable[[RequestOutput], None]] = {}
        self._ids = itertools.count()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="qwentrt-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.engine.has_unfinished()
                outputs = self.engine.step() if busy else []
            for out in outputs:
                self._deliver(out)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

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
        Raises RequestError at once for bad input."""
        with self._lock:
            self.engine.add_request(request_id, prompt, params, prompt_ids=prompt_ids, messages=messages)
            self._streams[request_id] = on_output
        self._wake.set()

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
        with self._lock:
            self.engine.abort(request_id)
            self._streams.pop(request_id, None)

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

    def stats(self) -> dict[str, int]:
        with self._lock:
            return self.engine.stats()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
