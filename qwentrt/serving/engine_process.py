"""The engine loop in its own process (the `qwen3` model's `engine_process` option), so that it never waits
for the GIL of the Triton stub, whose sender thread builds and sends the responses.

In one process, every torch call of the engine loop releases and retakes the GIL, and the sender holds it
while it builds responses: the loop waits for the sender's Python each time, and a host-bound step gets
longer (measured in docs/RELIABILITY.md, "Engine process"). vLLM v1 splits its EngineCore off the same way.

    stub (Triton's Python backend)                      engine process (python -m qwentrt.serving.engine_process)
      EngineClient.add / abort  ---- ("add", ...) ---->   intake thread: AsyncEngine.add (validate, tokenize)
                                <--- ("added", ...) ---     its answer (RequestError -> INVALID_ARG)
      reader thread -> callbacks <--- ("out", [...]) ---   engine thread: one message per step, its outputs
      stats()                   <--- ("stats", ...) ---    every 0.1 s: counters, waiting, memory state
      healthy / dead            <--- ("dead", why) ----    the engine cannot go on (its requests already ended)

Messages are pickled tuples over a socketpair. EngineClient offers what the backend uses of AsyncEngine
(add, abort, healthy, dead, num_waiting, stats, shutdown). Guarantees kept: a request refused by the engine
is refused at add(); every request the process accepted gets a final output, even if the process dies
(then with finish_reason "error" and why); the process exits when its stub goes away (socket closed), so
no engine outlives its server."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from qwentrt.config import SamplingParams
from qwentrt.engine.async_engine import EngineUnavailable
from qwentrt.engine.engine import RequestError, RequestOutput
from qwentrt.serving.lifecycle import stacks_later

ENV = "QWENTRT_ENGINE_PROCESS"  # what engine_process: auto means: 1 (a process) or 0 (a thread)
STATS_S = 0.1  # how often the engine process sends its counters
ADD_TIMEOUT_S = 120.0  # an add the engine process has not answered by then fails (INTERNAL) and is aborted


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or failed a request in a way that is not the request's fault."""


def wanted(param: str | None, device: str | None) -> bool:
    """Whether to run the engine in its own process: the model parameter engine_process (true / false /
    auto); auto (the default) follows $QWENTRT_ENGINE_PROCESS (1 / 0) when set, else: a process on CUDA."""
    raw = (param or "auto").strip().lower()
    source = "config.pbtxt parameter engine_process"
    if raw == "auto" and os.environ.get(ENV):
        raw, source = os.environ[ENV].strip().lower(), f"${ENV}"
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    if raw == "auto":
        if device is None:
            import torch

            return torch.cuda.is_available()
        return device.startswith("cuda")
    raise ValueError(f"{source}: {raw!r} is not true, false or auto")


def _pack(out: RequestOutput) -> tuple:
    return (out.request_id, out.text, out.token_ids, out.num_prompt_tokens, out.num_output_tokens, out.finished,
            out.finish_reason, out.logprobs, out.cum_logprob, out.num_cached_tokens, out.error)


class EngineClient:
    """The stub's side: starts the engine process and talks to it. Same surface as AsyncEngine."""

    def __init__(self, params: dict[str, str], python: str | None = None, start_timeout_s: float = 3600):
        self.dead: str | None = None
        self._callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self._acks: dict[str, list] = {}  # request id -> [Event, answer]
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stats: dict[str, int] = {}
        self._memory: dict[str, int] = {}
        self._waiting = 0
        self._stopping = False
        parent, child = socket.socketpair()
        self._sock = parent
        self._conn = Connection(os.dup(parent.fileno()))
        python = python or _python()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(_package_paths()))
        self.process = subprocess.Popen([python, "-m", "qwentrt.serving.engine_process", str(child.fileno())],
                                        pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL,
                                        close_fds=True)
        child.close()
        self._send(("init", params))
        kind, info = self._first_message(start_timeout_s)
        if kind != "ready":
            self._reap()
            raise EngineProcessError(f"the engine process could not start: {info}")
        self.max_seq_len: int = info["max_seq_len"]
        self.max_batch_size: int = info["max_batch_size"]
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, name="qwentrt-engine-reader", daemon=True)
        self._reader.start()

    def _first_message(self, timeout_s: float) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._conn.poll(0.5):
                try:
                    return self._conn.recv()
                except EOFError:
                    break
            if self.process.poll() is not None:
                break
        code = self.process.poll()
        return "failed", (f"it exited with code {code} before it was ready (see the server log above)" if code is not
                          None else f"not ready after {timeout_s:.0f} s")

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    # ---- what the backend uses ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.dead is None

    @property
    def num_waiting(self) -> int:
        return self._waiting

    def add(self, request_id: str, on_output: Callable[[RequestOutput], None], prompt: str | None = None,
            params: SamplingParams | None = None, messages: list[dict] | None = None,
            prompt_ids: list[int] | None = None) -> None:
        """Add a request (validated and tokenized in the engine process); raises RequestError for bad input,
        EngineUnavailable once the engine has stopped, EngineProcessError for anything else."""
        if self.dead is not None:
            raise EngineUnavailable(self.dead)
        ack = [threading.Event(), None]
        with self._lock:
            if request_id in self._callbacks:
                raise RequestError(f"request id {request_id!r} is already running")
            self._callbacks[request_id] = on_output  # outputs may come before the answer
            self._acks[request_id] = ack
        try:
            self._send(("add", request_id, prompt, params, messages, prompt_ids))
        except OSError:
            pass  # the process is gone: the reader says so below
        answered = ack[0].wait(ADD_TIMEOUT_S)
        with self._lock:
            self._acks.pop(request_id, None)
        answer = ack[1] if answered else (
            "internal", f"the engine process (pid {self.process.pid}) did not take the request in {ADD_TIMEOUT_S:.0f} s")
        if not answered:
            self.abort(request_id)
        if answer is None:
            return
        with self._lock:
            self._callbacks.pop(request_id, None)
        kind, message = answer
        raise {"request": RequestError, "unavailable": EngineUnavailable}.get(kind, EngineProcessError)(message)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._callbacks.pop(request_id, None)
        try:
            self._send(("abort", request_id))
        except OSError:
            pass

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def memory_state(self) -> dict[str, int]:
        return {"engine_callbacks": len(self._callbacks), **self._memory}

    def shutdown(self, timeout_s: float = 15) -> None:
        self._stopping = True
        try:
            self._send(("stop",))
        except OSError:
            pass
        self._reap(timeout_s)
        self._reader.join(timeout=5)

    def _reap(self, timeout_s: float = 15) -> None:
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"qwentrt: the engine process (pid {self.process.pid}) did not stop in {timeout_s:.0f} s; "
                  "killing it", file=sys.stderr, flush=True)
            self.process.kill()
            self.process.wait()
        self._conn.close()
        self._sock.close()

    # ---- messages from the engine process ---------------------------------------------------------
    def _read(self) -> None:
        conn = self._conn
        why = None
        try:
            while True:
                msg = conn.recv()
                kind = msg[0]
                if kind == "out":
                    self._waiting = msg[2]
                    self._deliver(msg[1])
                elif kind == "added":
                    self._waiting = msg[3]
                    with self._lock:
                        ack = self._acks.get(msg[1])
                    if ack is not None:
                        ack[1] = msg[2]
                        ack[0].set()
                elif kind == "stats":
                    self._stats, self._memory, self._waiting = msg[1], msg[2], msg[1].get("waiting", 0)
                elif kind == "dead":
                    why = msg[1]
                    self.dead = why
        except (EOFError, OSError):
            pass
        except Exception as e:  # a message that cannot be read: the process's state is unknown from here
            why = f"a message from the engine process could not be read: {type(e).__name__}: {e}"
        if self._stopping and why is None:
            return
        if why is None:
            code = self.process.poll()
            if code is None:
                try:
                    code = self.process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
            why = f"the engine process (pid {self.process.pid}) exited unexpectedly ({how})"
        self._fail(why)

    def _deliver(self, packed: list[tuple]) -> None:
        callbacks = self._callbacks
        for t in packed:
            callback = callbacks.get(t[0])
            if callback is None:
                continue
            out = RequestOutput(*t)
            if out.finished:
                with self._lock:
                    callbacks.pop(out.request_id, None)
            try:
                callback(out)
            except Exception:  # a consumer's fault must not stop the reader
                self.abort(out.request_id)

    def _fail(self, why: str) -> None:
        """The engine is gone: every request still registered gets a final error, waiting adds are refused."""
        self.dead = self.dead or why
        with self._lock:
            left = list(self._callbacks.items())
            self._callbacks.clear()
            acks = list(self._acks.values())
        for ack in acks:
            ack[1] = ("unavailable", why)
            ack[0].set()
        for rid, callback in left:
            try:
                callback(RequestOutput(rid, "", [], 0, 0, True, "error", error=why))
            except Exception:
                pass
        if self.process.poll() is None and not self._stopping:
            self.process.kill()  # it stopped talking: do not leave it holding the GPU


def _package_paths() -> list[str]:
    """This process's package paths (qwentrt's environment, which the stub's shim put on sys.path), without
    its standard library: the engine process's interpreter has its own."""
    import sysconfig

    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    keep = []
    for p in sys.path:
        real = os.path.realpath(p) if p else ""
        if real and os.path.isdir(real) and not any(real == s or real.startswith(s + os.sep) and
                                                     "-packages" not in real for s in stdlib):
            keep.append(p)
    return keep


def _python() -> str:
    """An interpreter for the engine process: this one's (the stub embeds Python: sys.executable may be the
    stub itself), else python3.X on PATH."""
    import shutil

    exe = sys.executable
    if exe and "python" in os.path.basename(exe) and os.access(exe, os.X_OK):
        return exe
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = shutil.which(version) or shutil.which("python3")
    if found is None:
        raise EngineProcessError(f"no Python interpreter for the engine process ({version} is not on PATH); set "
                                 "engine_process: false or the model parameter python_executable")
    return found


# ---- the engine process ---------------------------------------------------------------------------
class _Server:
    """Every message to the stub goes through one queue and a writer thread, in order: the engine thread
    never waits on the socket. (It did: when the stub's response threads fell behind at 512 streams, a full
    socket buffer held every engine step up to the stub's pace, and the served engine ran at 0.74 of
    engine-direct on the H100.) A stub that falls behind gets several steps' outputs at once, which its
    sender coalesces into fewer responses."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.lock = threading.Lock()  # dead_sent
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.batch: list[tuple] = []
        self.service = None
        self.dead_sent = False
        self.writer = threading.Thread(target=self._write, name="qwentrt-engine-writer", daemon=True)
        self.writer.start()

    def _write(self) -> None:
        try:
            while True:
                msg = self.outbox.get()
                if msg is None:
                    return
                self.conn.send(msg)
        except (OSError, ValueError):
            os._exit(0)  # the stub is gone

    def send(self, msg: tuple) -> None:
        self.outbox.put(msg)

    def close(self, timeout_s: float = 10) -> None:
        """Send what is queued, then stop the writer."""
        self.outbox.put(None)
        self.writer.join(timeout_s)

    def send_dead_once(self) -> None:
        with self.lock:
            if self.service is None or self.service.dead is None or self.dead_sent:
                return
            self.dead_sent = True
        self.send(("dead", self.service.dead))

    def on_output(self, out: RequestOutput) -> None:  # engine thread
        self.batch.append(_pack(out))

    def flush(self) -> None:  # engine thread, after each step's outputs
        batch, self.batch = self.batch, []
        if batch:
            self.send(("out", batch, self.service.num_waiting if self.service else 0))
        self.send_dead_once()

    def run(self) -> None:
        from qwentrt.engine.async_engine import AsyncEngine
        from qwentrt.engine.engine import LLMEngine
        from qwentrt.serving import faults

        kind, params = self.conn.recv()
        assert kind == "init", kind
        try:
            optional_int = lambda key: int(params[key]) if params.get(key) else None  # noqa: E731
            engine = LLMEngine(params["engine_dir"], device=params.get("device") or None,
                               allow_gpu_mismatch=params.get("allow_gpu_mismatch", "false") == "true",
                               num_blocks=optional_int("num_kv_blocks"), max_batch_size=optional_int("max_batch_size"))
            fault_spec = os.environ.get(faults.ENV) or params.get("fault_inject")
            if fault_spec:
                faults.install(engine, fault_spec)
            self.service = AsyncEngine(engine, int(params.get("max_consecutive_step_faults", 3)),
                                       after_outputs=self.flush)
        except Exception as e:
            import traceback

            traceback.print_exc()  # (into tritonserver's log, beside the stub's error)
            self.send(("failed", f"{type(e).__name__}: {e}"))
            self.close()
            return
        self.engine = engine
        self.send(("ready", {"max_seq_len": engine.max_seq_len, "max_batch_size": engine.max_batch_size,
                             "pid": os.getpid()}))
        self.intake()

    def intake(self) -> None:
        conn, service = self.conn, self.service
        next_stats = 0.0
        while True:
            now = time.monotonic()
            if now >= next_stats:
                self.send_stats()
                next_stats = now + STATS_S
            if not conn.poll(max(0.0, next_stats - time.monotonic())):
                continue
            msg = conn.recv()  # EOFError: the stub is gone (handled in main)
            kind = msg[0]
            if kind == "add":
                _, rid, prompt, params, messages, prompt_ids = msg
                answer = None
                try:
                    service.add(rid, self.on_output, prompt, params, messages=messages, prompt_ids=prompt_ids)
                except RequestError as e:
                    answer = ("request", str(e))
                except EngineUnavailable as e:
                    answer = ("unavailable", str(e))
                except Exception as e:
                    answer = ("internal", f"{type(e).__name__}: {e}")
                self.send(("added", rid, answer, service.num_waiting))
            elif kind == "abort":
                service.abort(msg[1])
            elif kind == "stop":
                t0 = time.monotonic()
                stacks_later(4)  # a stop that hangs: every thread's stack in the log
                service.shutdown()
                t1 = time.monotonic()
                self.close()
                stacks_later(None)
                t2 = time.monotonic()
                if t2 - t0 > 2:
                    print(f"qwentrt: the engine process took {t2 - t0:.1f} s to stop: {t1 - t0:.1f} s for the engine "
                          f"loop, {t2 - t1:.1f} s to send what was queued", file=sys.stderr, flush=True)
                return

    def send_stats(self) -> None:
        service, e = self.service, self.engine
        bm = e.block_manager
        memory = {"engine_seqs": len(e._seqs), "waiting": len(e.scheduler.waiting),
                  "running": len(e.scheduler.running), "kv_seqs": len(bm._seqs),
                  "prefix_cache_pages": len(bm._hash_to_block), "kv_pages": bm.num_blocks,
                  "engine_process_callbacks": len(service._streams)}
        self.send(("stats", service.stats(), memory))
        self.send_dead_once()  # (the engine thread sends it too, after its outputs)


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    try:
        _Server(conn).run()
    except (EOFError, OSError):  # the stub is gone: nothing to answer to
        pass
    # Everything is sent: leave without the interpreter's teardown (threads, CUDA context, allocator), which
    # can take seconds that tritonserver's exit timeout counts, and has nothing left to save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
