"""The requests a point sends: exact-length synthetic prompts, each its own (seeded by the point and its
index, so no two share a cached prefix, warmup included), the same in every mode and for the peer."""

from __future__ import annotations

import zlib

from qwentrt.bench.grid import Point
from qwentrt.bench.prompts import synthetic_prompt

WARMUP_OUTPUT_TOKENS = 8  # warmup requests are short: they only exercise the point's shapes


def prompt_seed(base: int, point: Point, kind: str, index: int) -> int:
    return zlib.crc32(f"{base}/{point.isl}/{point.osl}/{point.concurrency}/{kind}/{index}".encode())


class Prompts:
    """Lazily made, cached prompt texts of one point: `measured(i)` and `warmup(i)`."""

    def __init__(self, point: Point, base_seed: int = 0):
        self.point, self.base_seed = point, base_seed
        self._cache: dict[tuple[str, int], str] = {}

    def _get(self, kind: str, index: int) -> str:
        key = (kind, index)
        if key not in self._cache:
            seed = prompt_seed(self.base_seed, self.point, kind, index)
            self._cache[key] = synthetic_prompt(self.point.isl, seed=seed)
        return self._cache[key]

    def measured(self, index: int) -> str:
        return self._get("measured", index)

    def warmup(self, index: int) -> str:
        return self._get("warmup", index)

    def prefetch(self, n: int) -> None:
        """Make the first n measured prompts now, so that making them is not timed."""
        for i in range(n):
            self.measured(i)
