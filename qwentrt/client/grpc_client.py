"""gRPC client for the qwentrt server: the decoupled "qwen3" model behind Triton.

Every generation is streamed, so that the client sees each response arrive and can time it. The
server speaks the TensorRT-LLM ensemble tensor names; each request is one row (batch dim 1).

How a request ends. Triton marks the last response of a decoupled request with the
`triton_final_response` parameter. That flag may ride on the last data response, or on an empty
response (no outputs) sent after it; both are handled. `finish_reason` is "" until the last data
response, which carries "stop", "length", "abort" or "error".

Errors. Over a gRPC stream Triton sends a failed request's message only, not its status code
(`ModelStreamInferResponse` has no code field), so `ServerError.code` comes from the gRPC status
where there is one (connection refused, deadline, cancel) and otherwise from the message text: an
explicit code name in it (e.g. "INVALID_ARGUMENT: max_tokens must be >= 1") wins, then Triton's
own wording for rejected inputs and unknown models, else "INTERNAL".
"""

from __future__ import annotations

import itertools
import json
import queue
import re
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from qwentrt.errors import QwentrtError

GUIDE_TYPES = ("json_schema", "json", "regex", "ebnf_grammar")
FINISH_REASONS = ("stop", "length", "abort", "error")


# --------------------------------------------------------------------------------------- errors

class ServerError(QwentrtError):
    """The server (or the connection to it) failed a request.

    `code` is a gRPC status name ("INVALID_ARGUMENT", "UNAVAILABLE", "DEADLINE_EXCEEDED", ...);
    `message` is the server's text, reduced to its last line when it is a Python traceback."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
          "CANCELLED", "UNIMPLEMENTED", "FAILED_PRECONDITION", "ALREADY_EXISTS", "INTERNAL",
          "UNKNOWN", "ABORTED", "OUT_OF_RANGE", "PERMISSION_DENIED", "UNAUTHENTICATED")
_EXPLICIT = re.compile(r"\b(" + "|".join(_CODES) + r")\b")
# Triton's wording when it rejects a request before the model runs, and Python exceptions that
# mean "bad parameter" (PyTriton sends the model's traceback as the message).
_BY_TEXT = [
    (re.compile(r"expected \d+ inputs|expected number of inputs|unexpected inference input|data-type is|unexpected shape"
                r"|input byte size|batch size does not match|BadParameterError|ValueError"), "INVALID_ARGUMENT"),
    (re.compile(r"unknown model|is not found|is not ready"), "NOT_FOUND"),
    (re.compile(r"[Cc]ancel"), "CANCELLED"),
]


def _short(text: str) -> str:
    """The last line of a traceback; other messages as they are."""
    text = text.strip()
    if text.startswith("Traceback"):
        last = text.splitlines()[-1]
        name, sep, rest = last.partition(": ")
        return f"{name.rsplit('.', 1)[-1]}{sep}{rest}"
    return text


# qwentrt's server starts its messages with Triton's code in brackets: "[INVALID_ARG] max_tokens: ...".
_TRITON_PREFIX = re.compile(r"^\[(INVALID_ARG|UNAVAILABLE|INTERNAL|NOT_FOUND|UNSUPPORTED|ALREADY_EXISTS|CANCELLED)\] ")
_TRITON_TO_GRPC = {"INVALID_ARG": "INVALID_ARGUMENT", "UNSUPPORTED": "UNIMPLEMENTED"}


def _code_from_text(text: str) -> str:
    if m := _TRITON_PREFIX.match(text):
        return _TRITON_TO_GRPC.get(m.group(1), m.group(1))
    if m := _EXPLICIT.search(text):
        return m.group(1)
    for pattern, code in _BY_TEXT:
        if pattern.search(text):
            return code
    return "INTERNAL"


def to_server_error(exc: BaseException) -> ServerError:
    """Map a tritonclient/grpc exception to ServerError."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):  # grpc.aio raises these as they are
        return ServerError(exc.code().name, exc.details() or "")
    if isinstance(exc, InferenceServerException):
        text = _short(exc.message() or "")
        status = exc.status()
        code = status.removeprefix("StatusCode.") if status else _code_from_text(text)
        return ServerError(code, _TRITON_PREFIX.sub("", text))
    return ServerError("UNKNOWN", f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------ requests

def _tensor(name: str, value: Any, datatype: str) -> grpcclient.InferInput:
    """One input row: a scalar becomes [1, 1], a list becomes [1, n]."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if datatype == "BYTES":
        arr = np.array([[v.encode() if isinstance(v, str) else v for v in values]], dtype=object)
    else:
        dtype = {"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_}[datatype]
        arr = np.array([values], dtype=dtype)
    t = grpcclient.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr)
    return t


@dataclass
class GenerateParams:
    """Sampling and decoding options. `None` means "not sent": the server's default applies."""

    max_tokens: int = 256
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    min_tokens: int | None = None
    stop: Sequence[str] | None = None  # stop_words
    bad_words: Sequence[str] | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    guide_type: str | None = None  # one of GUIDE_TYPES
    guide: str | dict | None = None  # a dict is sent as JSON (a JSON schema)
    exclude_input_in_output: bool | None = None
    return_log_probs: bool | None = None
    end_id: int | None = None

    # (field, tensor name, Triton datatype) for the optional scalars and lists
    _OPTIONAL = (
        ("temperature", "temperature", "FP32"), ("top_k", "top_k", "INT32"),
        ("top_p", "top_p", "FP32"), ("seed", "seed", "UINT64"),
        ("min_tokens", "min_tokens", "INT32"), ("stop", "stop_words", "BYTES"),
        ("bad_words", "bad_words", "BYTES"), ("repetition_penalty", "repetition_penalty", "FP32"),
        ("presence_penalty", "presence_penalty", "FP32"),
        ("frequency_penalty", "frequency_penalty", "FP32"),
        ("exclude_input_in_output", "exclude_input_in_output", "BOOL"),
        ("return_log_probs", "return_log_probs", "BOOL"), ("end_id", "end_id", "INT32"),
    )

    def to_inputs(self, prompt: str | None = None, messages: list[dict] | None = None,
                  stream: bool = True) -> list[grpcclient.InferInput]:
        """The request tensors: `text_input` (a prompt) or `messages` (a chat, sent as JSON), plus
        `max_tokens`, `stream` and every option that is set."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if (self.guide_type is None) != (self.guide is None):
            raise ValueError("guide_type and guide go together")
        if self.guide_type is not None and self.guide_type not in GUIDE_TYPES:
            raise ValueError(f"guide_type must be one of {GUIDE_TYPES}, not {self.guide_type!r}")
        if prompt is not None:
            inputs = [_tensor("text_input", prompt, "BYTES")]
        else:
            inputs = [_tensor("messages", json.dumps(messages), "BYTES")]
        inputs += [_tensor("max_tokens", self.max_tokens, "INT32"), _tensor("stream", stream, "BOOL")]
        for attr, name, datatype in self._OPTIONAL:
            value = getattr(self, attr)
            if datatype == "BYTES" and value is not None:
                value = [value] if isinstance(value, str) else list(value) or None
            if value is not None:
                inputs.append(_tensor(name, value, datatype))
        if self.guide_type is not None:
            guide = self.guide if isinstance(self.guide, str) else json.dumps(self.guide)
            inputs += [_tensor("guided_decoding_guide_type", self.guide_type, "BYTES"),
                       _tensor("guided_decoding_guide", guide, "BYTES")]
        return inputs


# ----------------------------------------------------------------------------------- responses

@dataclass
class Delta:
    """One streamed response: the text new since the previous one, the cumulative token count,
    and the finish reason ("" until the last data response)."""

    text: str
    num_output_tokens: int
    finish_reason: str = ""
    num_input_tokens: int | None = None
    cum_log_prob: float | None = None


def _scalar(result, name: str):
    arr = result.as_numpy(name)
    return None if arr is None or arr.size == 0 else arr.reshape(-1)[0]


def parse_response(result) -> tuple[Delta | None, bool]:
    """(delta, final) for one tritonclient InferResult; delta is None for an empty final response."""
    resp = result.get_response()
    final = "triton_final_response" in resp.parameters and resp.parameters["triton_final_response"].bool_param
    if not resp.outputs:
        return None, final
    text, reason = _scalar(result, "text_output"), _scalar(result, "finish_reason")
    n_out, n_in, lp = (_scalar(result, k) for k in ("num_output_tokens", "num_input_tokens", "cum_log_probs"))
    as_str = lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
    return Delta(as_str(text), int(n_out) if n_out is not None else 0, as_str(reason),
                 int(n_in) if n_in is not None else None, float(lp) if lp is not None else None), final


@dataclass
class Timings:
    """Clock readings (time.perf_counter, seconds) of one generation. `token_times[i]` is when the
    i-th response carrying tokens arrived and `token_counts[i]` how many new tokens it carried."""

    start: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    end: float | None = None

    def add(self, t: float, new_tokens: int) -> None:
        if new_tokens <= 0:
            return
        if self.first_token is None:
            self.first_token = t
        self.token_times.append(t)
        self.token_counts.append(new_tokens)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e_s(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def inter_token_s(self) -> list[float]:
        """One gap per token after the first (len = tokens - 1). A response carrying k tokens after
        a gap g gives k entries of g / k; extra tokens in the first response get 0 (they came with
        it). So mean(inter_token_s) == tpot_s."""
        if not self.token_counts:
            return []
        out = [0.0] * (self.token_counts[0] - 1)
        for prev, t, k in zip(self.token_times, self.token_times[1:], self.token_counts[1:]):
            out += [(t - prev) / k] * k
        return out

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (last token - first token) / (tokens - 1)."""
        n = sum(self.token_counts)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)


@dataclass
class Generation:
    text: str
    num_input_tokens: int | None
    num_output_tokens: int
    finish_reason: str
    timings: Timings
    cum_log_prob: float | None = None
    chunks: int = 0  # responses that carried outputs


class _Collector:
    """Folds deltas into a Generation while timing them."""

    def __init__(self):
        self.timings = Timings(start=time.perf_counter())
        self.parts: list[str] = []
        self.n_out, self.n_in, self.reason, self.lp, self.chunks = 0, None, "", None, 0

    def add(self, d: Delta) -> None:
        self.timings.add(time.perf_counter(), d.num_output_tokens - self.n_out)
        self.parts.append(d.text)
        self.n_out = max(self.n_out, d.num_output_tokens)
        self.n_in = d.num_input_tokens if d.num_input_tokens is not None else self.n_in
        self.lp = d.cum_log_prob if d.cum_log_prob is not None else self.lp
        self.reason = d.finish_reason or self.reason
        self.chunks += 1

    def result(self) -> Generation:
        self.timings.end = time.perf_counter()
        return Generation("".join(self.parts), self.n_in, self.n_out, self.reason, self.timings,
                          self.lp, self.chunks)


# -------------------------------------------------------------------------------------- clients

class Client:
    """Blocking client. One gRPC stream per Client, one request at a time on it (calls from
    several threads wait their turn, so do not call it again from inside a `stream` loop); use
    AsyncClient for concurrency.

    >>> with Client("localhost:8001") as c:
    ...     print(c.generate("Hello", params=GenerateParams(max_tokens=16)).text)
    """

    def __init__(self, url: str = "localhost:8001", model: str = "qwen3", verbose: bool = False):
        self.url, self.model = url, model
        self._client = grpcclient.InferenceServerClient(url, verbose=verbose)
        self._lock = threading.Lock()
        self._responses: queue.Queue | None = None  # set while a stream is open
        self._ids = itertools.count()

    def is_ready(self) -> bool:
        """Server live and ready, and the model loaded."""
        try:
            return self._client.is_server_ready() and self._client.is_model_ready(self.model)
        except InferenceServerException:
            return False

    def metrics(self, url_http: str = "http://localhost:8002/metrics", timeout: float = 5.0) -> dict[str, float]:
        """Triton's Prometheus metrics as {"name{labels}": value}."""
        with urllib.request.urlopen(url_http, timeout=timeout) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def _open(self) -> queue.Queue:
        if self._responses is None:
            q: queue.Queue = queue.Queue()
            self._client.start_stream(callback=lambda result, error: q.put((result, error)))
            self._responses = q
        return self._responses

    def _reset(self) -> None:
        """Drop the stream, cancelling whatever is still running on it (the next call opens a new one)."""
        if self._responses is not None:
            self._responses = None
            self._client.stop_stream(cancel_requests=True)

    def stream(self, prompt: str | None = None, messages: list[dict] | None = None,
               params: GenerateParams | None = None, timeout: float | None = None) -> Iterator[Delta]:
        """Yield a Delta per data response. `timeout` (seconds) bounds the whole generation; past it
        the request is cancelled and ServerError("DEADLINE_EXCEEDED") raised. Leaving the loop early
        cancels the request."""
        inputs = (params or GenerateParams()).to_inputs(prompt, messages, stream=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            done = False
            try:
                q = self._open()
                rid = f"qwentrt-{next(self._ids)}"
                try:
                    self._client.async_stream_infer(self.model, inputs, request_id=rid,
                                                    enable_empty_final_response=True)
                except InferenceServerException as e:
                    # The stream died before the request went out (e.g. server unreachable);
                    # the reason, with its status, came through the callback.
                    try:
                        e = q.get(timeout=1.0)[1] or e
                    except queue.Empty:
                        pass
                    raise to_server_error(e) from None
                while not done:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    try:
                        result, error = q.get(timeout=wait)
                    except queue.Empty:
                        raise ServerError("DEADLINE_EXCEEDED", f"no complete answer within {timeout} s") from None
                    if error is not None:
                        raise to_server_error(error)
                    if result.get_response().id != rid:  # a straggler of an earlier, abandoned request
                        continue
                    delta, done = parse_response(result)
                    if delta is not None:
                        yield delta
            except InferenceServerException as e:
                raise to_server_error(e) from None
            finally:
                if not done:
                    self._reset()

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None,
                 params: GenerateParams | None = None, timeout: float | None = None) -> Generation:
        """The whole generation (deltas concatenated) with per-response timings."""
        c = _Collector()
        for d in self.stream(prompt, messages, params, timeout):
            c.add(d)
        return c.result()

    def close(self) -> None:
        with self._lock:
            self._reset()
            self._client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client: each generation gets its own gRPC stream on one shared channel, so hundreds
    can run at once. Create it inside a running event loop (e.g. `async with AsyncClient() as c`)."""

    def __init__(self, url: str = "localhost:8001", model: str = "qwen3"):
        import tritonclient.grpc.aio as grpcaio

        self.url, self.model = url, model
        self._client = grpcaio.InferenceServerClient(url)

    async def is_ready(self) -> bool:
        try:
            return await self._client.is_server_ready() and await self._client.is_model_ready(self.model)
        except (InferenceServerException, grpc.RpcError):
            return False

    async def stream(self, prompt: str | None = None, messages: list[dict] | None = None,
                     params: GenerateParams | None = None,
                     timeout: float | None = None) -> AsyncIterator[Delta]:
        """Yield a Delta per data response; `timeout` is the gRPC deadline of the stream. To stop
        early, close the iterator (`contextlib.aclosing`): that cancels the request."""
        inputs = (params or GenerateParams()).to_inputs(prompt, messages, stream=True)
        request = {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex}

        async def one_request():
            yield request  # then half-close: the server ends the stream once the request is done

        # Without `triton_enable_empty_final_response` (the aio API cannot set it) an empty final
        # response is not sent; the end of the stream marks the end of the request instead.
        responses = None
        done = False
        try:
            responses = self._client.stream_infer(one_request(), stream_timeout=timeout)
            async for result, error in responses:
                if error is not None:
                    raise to_server_error(error)
                delta, _ = parse_response(result)
                if delta is not None:
                    yield delta
            done = True
        except (InferenceServerException, grpc.RpcError) as e:
            raise to_server_error(e) from None
        finally:
            if not done and responses is not None:
                responses.cancel()

    async def generate(self, prompt: str | None = None, messages: list[dict] | None = None,
                       params: GenerateParams | None = None, timeout: float | None = None) -> Generation:
        c = _Collector()
        async for d in self.stream(prompt, messages, params, timeout):
            c.add(d)
        return c.result()

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
