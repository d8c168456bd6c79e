"""Typed configs: the Qwen3 model (read from a checkpoint's config.json), the build options, and the
engine description that `engine.json` holds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qwentrt.errors import ConfigError
from qwentrt.serde import from_dict, to_dict

ENGINE_FORMAT_VERSION = 1

WeightFormat = Literal["int4-awq", "bf16"]
KVCacheDtype = Literal["fp8-e4m3", "bf16"]


@dataclass(frozen=True)
class Qwen3Config:
    """The dense Qwen3 decoder: only what the math needs, named as in HF's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "bfloat16"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each projection in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_size, h),
            "self_attn.k_proj": (self.kv_size, h),
            "self_attn.v_proj": (self.kv_size, h),
            "self_attn.o_proj": (h, self.q_size),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the HF checkpoint with its shape, in HF names."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (self.hidden_size,)
            shapes[p + "post_attention_layernorm.weight"] = (self.hidden_size,)
            shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
            for name, shape in self.linear_shapes().items():
                shapes[p + name + ".weight"] = shape
        return shapes

    def num_parameters(self) -> int:
        n = 0
        for shape in self.tensor_shapes().values():
            size = 1
            for d in shape:
                size *= d
            n += size
        return n

    def kv_bytes_per_token(self, kv_dtype: KVCacheDtype) -> int:
        elem = 1 if kv_dtype == "fp8-e4m3" else 2
        return self.num_hidden_layers * 2 * self.kv_size * elem

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "Qwen3Config":
        """Read and validate a HF config.json dict; unsupported models get a message saying why."""
        model_type = hf.get("model_type")
        if model_type != "qwen3":
            hint = " (Qwen3 MoE models are not supported, only dense Qwen3)" if model_type == "qwen3_moe" else ""
            raise ConfigError(f"{source}: model_type is {model_type!r}, qwentrt supports 'qwen3' only{hint}")
        archs = hf.get("architectures") or ["Qwen3ForCausalLM"]
        if "Qwen3ForCausalLM" not in archs:
            raise ConfigError(f"{source}: architectures {archs} do not include Qwen3ForCausalLM")
        unsupported = {
            "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
            "attention_bias": (bool(hf.get("attention_bias", False)), False),
            "use_sliding_window": (bool(hf.get("use_sliding_window", False)), False),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ConfigError(f"{source}: {key}={got!r} is not supported (only {want!r})")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling not in (None, {}) and (rope_scaling or {}).get("rope_type", rope_scaling.get("type")) != "default":
            raise ConfigError(f"{source}: rope_scaling {rope_scaling} is not supported yet (only plain RoPE)")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers 5 moved it under rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 1_000_000)
        try:
            cfg = cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=int(hf["num_attention_heads"]),
                num_key_value_heads=int(hf.get("num_key_value_heads", hf["num_attention_heads"])),
                head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos_ids,
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{source}: {key} must be positive, got {getattr(self, key)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                              f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim ({self.head_dim}) must be even for RoPE")

    def to_hf(self) -> dict[str, Any]:
        """A HF config.json for this model (what `qwentrt synth` writes)."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "use_sliding_window": False,
            "sliding_window": None,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": self.torch_dtype,
        }


def default_max_batch_size(budget_gib: float) -> int:
    """Running requests per step when --max-batch-size is not given: 512 on cards of 40 GiB or more (an H100
    runs 1000-in / 1000-out at 9,841 output tok/s at concurrency 512 against 8,150 at 256: docs/PERFORMANCE.md,
    fifth run), 256 below (a 24 GiB card's KV cache holds ~268k tokens: a larger batch would only cost memory)."""
    return 512 if budget_gib >= 40 else 256


@dataclass(frozen=True)
class BuildConfig:
    """What `qwentrt build` was asked for (its CLI options, typed)."""

    weights: WeightFormat = "int4-awq"
    kv_cache: KVCacheDtype = "fp8-e4m3"
    group_size: int = 128
    calib: str | None = None  # a text/JSONL file; None = the set shipped in the package
    calib_samples: int = 128
    calib_seqlen: int = 512
    awq_grid: int = 20
    max_batch_size: int | None = None  # None: default_max_batch_size(the GPU budget)
    max_num_tokens: int = 8192
    max_seq_len: int = 32768
    kv_block_size: int = 32
    target: str = "auto"  # "auto" (the GPU building it, else sm_89) or "sm_89", "sm_90", ...
    gpu_memory_gib: float | None = None  # None = the target card's memory
    device: str = "auto"
    seed: int = 0
    tune: str = "auto"  # time kernel configs on the GPU: "auto" (when building on the target's GPU), "on", "off"

    def validate(self) -> None:
        if self.tune not in ("auto", "on", "off"):
            raise ConfigError(f"--tune must be auto, on or off, got {self.tune!r}")
        if self.group_size not in (32, 64, 128):
            raise ConfigError(f"group size {self.group_size} is not supported (32, 64 or 128)")
        for key in ("calib_samples", "calib_seqlen", "awq_grid", "max_batch_size", "max_num_tokens",
                    "max_seq_len", "kv_block_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.kv_block_size & (self.kv_block_size - 1):
            raise ConfigError(f"--kv-block-size must be a power of two, got {self.kv_block_size}")
        if self.max_batch_size is not None and self.max_num_tokens < self.max_batch_size:
            raise ConfigError(f"--max-num-tokens ({self.max_num_tokens}) must be at least --max-batch-size "
                              f"({self.max_batch_size}): every running request decodes one token per step")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ConfigError(f"--gpu-memory must be positive, got {self.gpu_memory_gib}")


@dataclass(frozen=True)
class WeightsSpec:
    format: WeightFormat
    file: str = "model.safetensors"
    group_size: int = 128
    zero_point: bool = True
    layout: str = "autoawq-gemm"  # qweight int32 [K, N/8], qzeros [K/G, N/8], scales [K/G, N]
    source: str = "awq-search"  # "awq-search" | "checkpoint-awq" | "checkpoint"
    bytes: int = 0


@dataclass(frozen=True)
class KVCacheSpec:
    dtype: KVCacheDtype
    block_size: int
    num_blocks: int
    bytes_per_token: int
    k_scales: list[float] = field(default_factory=list)  # per layer; dequant: x = fp8 * scale
    v_scales: list[float] = field(default_factory=list)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    max_input_len: int


@dataclass(frozen=True)
class TargetGPU:
    name: str
    compute_capability: str  # "8.9"
    memory_gib: float


@dataclass(frozen=True)
class MemoryPlan:
    """How the GPU budget is spent (bytes); kv_cache is what is left after the rest."""

    budget: int
    weights: int
    activations: int
    cuda_graphs_and_workspace: int
    cuda_context: int
    headroom: int
    kv_cache: int


@dataclass(frozen=True)
class BuildInfo:
    qwentrt_version: str
    created: str
    checkpoint: str
    device: str
    wall_s: float = 0.0
    peak_gpu_memory_bytes: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    awq: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to run an engine: the whole of `engine.json`."""

    format_version: int
    model: Qwen3Config
    weights: WeightsSpec
    kv_cache: KVCacheSpec
    limits: Limits
    target: TargetGPU
    memory: MemoryPlan
    kernels: dict[str, Any]
    build: BuildInfo

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "engine.json") -> "EngineConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != ENGINE_FORMAT_VERSION:
            raise ConfigError(f"{source}: engine format version {version!r}, this qwentrt reads version "
                              f"{ENGINE_FORMAT_VERSION}: rebuild the engine with `qwentrt build`")
        return from_dict(cls, data, source)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "engine.json"
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "EngineConfig":
        path = Path(folder) / "engine.json"
        if not path.is_file():
            raise ConfigError(f"{folder}: no engine.json here; build one with `qwentrt build CHECKPOINT -o {folder}`")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))


GuideType = Literal["json_schema", "json", "regex", "ebnf_grammar"]


@dataclass
class SamplingParams:
    """How one request is decoded. `validate` raises ValueError naming the field and its limit."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    bad_words: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    guide_type: GuideType | None = None
    guide: str | None = None
    logprobs: bool = False
    skip_special_tokens: bool = True

    MAX_STOP = 64
    MAX_STOP_LEN = 256

    def validate(self, max_tokens_limit: int | None = None) -> None:
        import math

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise bad("max_tokens", f"{self.max_tokens} exceeds the limit {max_tokens_limit}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be within 0..max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        for name in ("repetition_penalty",):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise bad(name, f"must be a positive number, got {v}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or abs(v) > 2:
                raise bad(name, f"must be within [-2, 2], got {v}")
        for name in ("stop", "bad_words"):
            words = getattr(self, name)
            if len(words) > self.MAX_STOP:
                raise bad(name, f"at most {self.MAX_STOP} entries, got {len(words)}")
            for w in words:
                if not isinstance(w, str) or not w or len(w) > self.MAX_STOP_LEN:
                    raise bad(name, f"entries must be non-empty strings of at most {self.MAX_STOP_LEN} characters")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", f"must be within 0..2^63-1, got {self.seed}")
        if (self.guide_type is None) != (self.guide is None) and self.guide_type != "json":
            raise bad("guided_decoding_guide", "guide_type and guide go together")
