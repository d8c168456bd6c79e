"""A Triton request's tensors (TensorRT-LLM's ensemble names) -> what the engine needs, with every
bad input refused by a message naming the tensor and the limit. Pure numpy: tested without Triton."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwentrt.config import SamplingParams

# name -> (kind, required); kinds: text, texts (a list of strings), int, float, bool
INPUTS: dict[str, tuple[str, bool]] = {
    "text_input": ("text", False), "messages": ("text", False), "max_tokens": ("int", True),
    "stream": ("bool", False), "temperature": ("float", False), "top_k": ("int", False), "top_p": ("float", False),
    "seed": ("int", False), "min_tokens": ("int", False), "beam_width": ("int", False),
    "num_return_sequences": ("int", False), "repetition_penalty": ("float", False),
    "presence_penalty": ("float", False), "frequency_penalty": ("float", False), "length_penalty": ("float", False),
    "stop_words": ("texts", False), "bad_words": ("texts", False), "end_id": ("int", False), "pad_id": ("int", False),
    "exclude_input_in_output": ("bool", False), "return_log_probs": ("bool", False),
    "guided_decoding_guide_type": ("text", False), "guided_decoding_guide": ("text", False),
}
GUIDE_TYPES = ("json_schema", "json", "regex", "ebnf_grammar")
MAX_TEXT_BYTES = 4 << 20
MAX_WORDS = 64


TENSOR_OF = {"stop": "stop_words", "logprobs": "return_log_probs", "guide": "guided_decoding_guide",
             "guide_type": "guided_decoding_guide_type"}  # SamplingParams field -> input tensor


class BadRequest(ValueError):
    """INVALID_ARG for the client: the message names the tensor."""


@dataclass
class ParsedRequest:
    prompt: str | None
    messages: list[dict[str, Any]] | None
    params: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    guide_type: str | None = None
    schema: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _check_schema(guide: str) -> None:
    """A JSON schema that is not JSON, not a schema, or admits no value at all: INVALID_ARG now."""
    from jsonschema import Draft202012Validator, SchemaError

    from qwentrt.serving.json_validator import admits_nothing
    try:
        schema = json.loads(guide)
    except json.JSONDecodeError as e:
        raise BadRequest(f"guided_decoding_guide: not valid JSON ({e.msg} at {e.pos})") from None
    except RecursionError:
        raise BadRequest("guided_decoding_guide: nested too deeply") from None
    if not isinstance(schema, (dict, bool)):
        raise BadRequest(f"guided_decoding_guide: a JSON schema is an object or a boolean, got {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
        why = admits_nothing(schema)
    except SchemaError as e:
        raise BadRequest(f"guided_decoding_guide: invalid JSON schema: {e.message}") from None
    except RecursionError:
        raise BadRequest("guided_decoding_guide: the schema is nested too deeply") from None
    if why:
        raise BadRequest(f"guided_decoding_guide: the JSON schema admits no value, so no output can satisfy it: {why}")


def _scalar(name: str, kind: str, arr: np.ndarray) -> Any:
    if arr.size != 1:
        raise BadRequest(f"{name}: expected one value per request (shape [1, 1]), got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if kind == "text":
        return _text(name, value)
    if kind == "bool":
        if arr.dtype != np.bool_:
            raise BadRequest(f"{name}: expected BOOL, got {arr.dtype}")
        return bool(value)
    if kind == "int":
        if not np.issubdtype(arr.dtype, np.integer):
            raise BadRequest(f"{name}: expected an integer tensor, got {arr.dtype}")
        return int(value)
    if kind == "float":
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise BadRequest(f"{name}: expected FP32, got {arr.dtype}")
        f = float(value)
        if not math.isfinite(f):
            raise BadRequest(f"{name}: must be a finite number, got {f}")
        return f
    raise AssertionError(kind)


def _text(name: str, value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        if len(value) > MAX_TEXT_BYTES:
            raise BadRequest(f"{name}: {len(value)} bytes is over the limit of {MAX_TEXT_BYTES}")
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"{name}: not valid UTF-8 (byte {e.start})") from None
    if isinstance(value, str):
        return value
    raise BadRequest(f"{name}: expected BYTES (a string), got {type(value).__name__}")


def parse(inputs: dict[str, np.ndarray], max_tokens_limit: int,
          parameters: dict[str, Any] | None = None) -> ParsedRequest:
    """`inputs`: tensor name -> numpy array (batch dim included, one request); `parameters`: the request's
    parameters map, where qwentrt takes nothing (Triton's own `triton_...` ones are let through)."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise BadRequest(f"unknown input(s) {', '.join(unknown)}")
    unknown = sorted(k for k in parameters or {} if not k.startswith("triton_"))
    if unknown:
        raise BadRequest(f"parameters: unknown request parameter(s) {', '.join(map(repr, unknown))}: qwentrt takes "
                         f"its options as input tensors (e.g. max_tokens, temperature, top_p, stop_words)")
    values: dict[str, Any] = {}
    for name, arr in inputs.items():
        kind, _ = INPUTS[name]
        if kind == "texts":
            flat = arr.reshape(-1)
            if flat.size > MAX_WORDS:
                raise BadRequest(f"{name}: at most {MAX_WORDS} entries, got {flat.size}")
            words = [_text(name, v) for v in flat]
            # TensorRT-LLM clients may send one comma-separated string.
            values[name] = [w for text in words for w in (text.split(",") if flat.size == 1 else [text]) if w]
        else:
            values[name] = _scalar(name, kind, arr)
    if "max_tokens" not in values:
        raise BadRequest("max_tokens: required")
    prompt, messages = values.get("text_input"), None
    if "messages" in values:
        if prompt:
            raise BadRequest("give either text_input or messages, not both")
        try:
            messages = json.loads(values["messages"])
        except json.JSONDecodeError as e:
            raise BadRequest(f"messages: not valid JSON ({e.msg} at {e.pos})") from None
        except RecursionError:
            raise BadRequest("messages: nested too deeply") from None
    elif prompt is None:
        raise BadRequest("text_input: required (or messages)")
    elif prompt == "":
        raise BadRequest("text_input: the prompt is empty (it needs at least 1 token)")
    if values.get("beam_width", 1) != 1:
        raise BadRequest(f"beam_width: only 1 is supported, got {values['beam_width']}")
    if values.get("num_return_sequences", 1) != 1:
        raise BadRequest(f"num_return_sequences: only 1 is supported, got {values['num_return_sequences']}")
    seed = values.get("seed")
    if seed is not None and seed < 0:
        raise BadRequest(f"seed: must be >= 0, got {seed}")
    guide_type = values.get("guided_decoding_guide_type")
    guide = values.get("guided_decoding_guide")
    if guide_type is not None and guide_type not in GUIDE_TYPES:
        raise BadRequest(f"guided_decoding_guide_type: {guide_type!r} is not one of {', '.join(GUIDE_TYPES)}")
    if guide is not None and guide_type is None:
        raise BadRequest("guided_decoding_guide: needs guided_decoding_guide_type")
    if guide_type not in (None, "json") and not guide:
        raise BadRequest(f"guided_decoding_guide: required for guide type {guide_type}")
    if guide_type == "json_schema":
        _check_schema(guide)
    stop_ids = [values["end_id"]] if "end_id" in values else []
    params = SamplingParams(
        max_tokens=values["max_tokens"], min_tokens=values.get("min_tokens", 0),
        temperature=values.get("temperature", 1.0), top_k=values.get("top_k", 0), top_p=values.get("top_p", 1.0),
        seed=seed, stop=values.get("stop_words", []), stop_token_ids=stop_ids,
        bad_words=values.get("bad_words", []), repetition_penalty=values.get("repetition_penalty", 1.0),
        presence_penalty=values.get("presence_penalty", 0.0), frequency_penalty=values.get("frequency_penalty", 0.0),
        guide_type=guide_type, guide=guide if guide_type != "json" else None,
        logprobs=values.get("return_log_probs", False))
    if params.top_p == 0.0 and "top_p" in values and values.get("top_k", 0) <= 1:
        params.top_p = 1.0  # TensorRT-LLM clients send top_p 0 with top_k 1 for greedy
    if params.top_k == 1:
        params.temperature = 0.0
    try:
        params.validate(max_tokens_limit)
    except ValueError as e:  # name the tensor, not the SamplingParams field
        field_name, sep, why = str(e).partition(": ")
        raise BadRequest(f"{TENSOR_OF.get(field_name, field_name)}{sep}{why}") from None
    return ParsedRequest(prompt if messages is None else None, messages, params, values.get("stream", False),
                         values.get("exclude_input_in_output", False), guide_type,
                         guide if guide_type == "json_schema" else None)
