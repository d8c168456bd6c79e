"""What `qwentrt bench` is asked to measure: the options, typed, and the grid of points they span
(every ISL/OSL pair times every concurrency)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwentrt.errors import QwentrtError

# Yuan per GPU-hour used for the cost figure when none is given: a rough rental price of one H100 on a
# Chinese cloud (late 2026). An assumption, not a measurement: pass --price-per-gpu-hour for your own.
DEFAULT_PRICE_PER_GPU_HOUR = 20.0

QUICK = dict(isl=[16], osl=[8], concurrency=[1, 4])  # --quick: a smoke test in seconds on a CPU

MODES = ("engine", "served", "both", "none")  # none: only the peer (with --peer)


def parse_ints(values: str | list[str] | tuple[str, ...], name: str) -> list[int]:
    """'1,16,64' or ('1,16', '64') -> [1, 16, 64] (order kept, duplicates dropped); positive only."""
    if isinstance(values, str):
        values = [values]
    out: list[int] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise QwentrtError(f"{name}: expected positive integers separated by commas, got {part!r}") from None
            if n < 1:
                raise QwentrtError(f"{name}: values must be >= 1, got {n}")
            if n not in out:
                out.append(n)
    if not out:
        raise QwentrtError(f"{name}: no values given")
    return out


def pair_lengths(isl: list[int], osl: list[int]) -> list[tuple[int, int]]:
    """ISL/OSL pairs: one list of length 1 pairs with every entry of the other, equal lengths pair up
    position by position (--isl 128,1000 --osl 128,1000 -> (128,128), (1000,1000)), otherwise every
    combination."""
    if len(isl) == 1 or len(osl) == 1 or len(isl) != len(osl):
        return [(i, o) for i in isl for o in osl]
    return list(zip(isl, osl))


@dataclass(frozen=True)
class Point:
    isl: int
    osl: int
    concurrency: int
    num_requests: int

    @property
    def label(self) -> str:
        return f"ISL {self.isl} / OSL {self.osl} / C {self.concurrency}"


@dataclass
class BenchConfig:
    engine_dir: Path
    lengths: list[tuple[int, int]]
    concurrency: list[int]
    num_requests: int | None = None  # per point; None: max(2*C, 8)
    duration_s: float | None = None  # per point: keep issuing requests for this long instead of a count
    point_timeout_s: float = 900.0  # past this a point's in-flight requests are aborted (recorded as such)
    mode: str = "both"
    warmup: int = 1  # warmup rounds per point (C requests of the point's ISL, a few output tokens)
    peer: str | None = None  # "hf"
    peer_checkpoint: str | None = None
    peer_max_batch: int = 64
    peer_batches: int = 1  # timed generate() calls per point
    price_per_gpu_hour: float = DEFAULT_PRICE_PER_GPU_HOUR
    out: Path | None = None
    perf_analyzer: bool = False
    perf_analyzer_ms: int = 20000
    device: str | None = None
    server_timeout_s: float = 600.0
    nvml_interval_s: float = 0.05
    seed: int = 0
    served_params: dict[str, str] = field(default_factory=dict)  # qwen3 model parameters for served runs
    command: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QwentrtError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "none" and self.peer is None:
            raise QwentrtError("--mode none measures nothing without --peer hf")
        if self.peer not in (None, "hf"):
            raise QwentrtError(f"--peer: only 'hf' is known, got {self.peer!r}")
        if self.num_requests is not None and self.num_requests < 1:
            raise QwentrtError(f"--num-requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise QwentrtError(f"--duration must be positive, got {self.duration_s}")
        if self.served_params:
            from qwentrt.serving.repository import QWEN3_PARAMETERS
            unknown = sorted(set(self.served_params) - set(QWEN3_PARAMETERS))
            if unknown:
                raise QwentrtError(f"--served-param: unknown qwen3 model parameter(s) {', '.join(unknown)} "
                                   f"(known: {', '.join(QWEN3_PARAMETERS)})")
        if self.peer_max_batch < 1 or self.peer_batches < 1:
            raise QwentrtError("--peer-max-batch and --peer-batches must be >= 1")
        if self.price_per_gpu_hour < 0:
            raise QwentrtError(f"--price-per-gpu-hour must be >= 0, got {self.price_per_gpu_hour}")
        if self.warmup < 0:
            raise QwentrtError(f"--warmup must be >= 0, got {self.warmup}")

    @property
    def modes(self) -> list[str]:
        return {"both": ["engine", "served"], "none": []}.get(self.mode, [self.mode])

    def requests_for(self, concurrency: int) -> int:
        return self.num_requests if self.num_requests is not None else max(2 * concurrency, 8)

    def points(self) -> list[Point]:
        return [Point(i, o, c, self.requests_for(c)) for i, o in self.lengths for c in self.concurrency]
