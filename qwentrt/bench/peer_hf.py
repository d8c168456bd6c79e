"""The peer: HF transformers `generate` on the same weights (the checkpoint the engine was built from),
eager (no torch.compile), bf16 on a GPU (float32 on a CPU), greedy, min_new_tokens = max_new_tokens =
OSL. It runs static batches: batch = the point's concurrency capped by --peer-max-batch; all rows of a
batch share its timings (a streamer notes when each step's tokens reach the host)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

from qwentrt.bench.grid import BenchConfig, Point
from qwentrt.bench.nvml import NvmlSampler
from qwentrt.bench.runner_engine import _error_text, brief
from qwentrt.bench.stats import RequestRecord, point_result
from qwentrt.bench.workload import Prompts
from qwentrt.errors import QwentrtError

Log = Callable[[str], None]


def default_checkpoint(engine_dir: Path) -> str:
    """The checkpoint an engine was built from, as its engine.json records it (a folder or hub id)."""
    from qwentrt.config import EngineConfig

    source = EngineConfig.load(engine_dir).build.checkpoint
    if not source:
        raise QwentrtError(f"{engine_dir}/engine.json records no source checkpoint: pass --peer-checkpoint")
    path = Path(source)
    if path.is_absolute() or path.exists():
        return str(path)
    looks_like_path = source.startswith(".") or source.count("/") != 1
    if looks_like_path:
        raise QwentrtError(f"the engine was built from {source}, which is not here: pass --peer-checkpoint")
    return source  # a hub id


class _StepTimes:
    """A transformers streamer that only notes when each put() happens: the first is the prompt, each
    later one a step's new tokens (one per row)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFPeer:
    def __init__(self, checkpoint: str, device: str, log: Log):
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.checkpoint = checkpoint
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=self.dtype).to(self.device).eval()
        tok_file = Path(checkpoint) / "tokenizer.json"
        if tok_file.is_file():
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        else:
            self.tokenizer = Tokenizer.from_pretrained(checkpoint)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else (eos or 0)
        self.attn = getattr(self.model.config, "_attn_implementation", None)
        log(f"peer: loaded {checkpoint} ({self.dtype}, attention {self.attn}) on {self.device}")
        self._generate([self.tokenizer.encode("warm up", add_special_tokens=False).ids], 2)

    def close(self) -> None:
        import torch

        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate(self, rows: list[list[int]], new_tokens: int) -> tuple[float, list[float], int]:
        """One batch (left-padded); returns (start, step times, new tokens per row)."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        streamer = _StepTimes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                      top_k=None, pad_token_id=self.pad_id, streamer=streamer)
        return start, streamer.times, int(out.shape[1] - width)

    def run_point(self, cfg: BenchConfig, point: Point, sampler: NvmlSampler) -> dict:
        import torch

        batch = min(point.concurrency, cfg.peer_max_batch)
        prompts = Prompts(point, cfg.seed)
        n = batch * cfg.peer_batches
        extra = {"num_requests": n, "peer_batch": batch, "peer_checkpoint": self.checkpoint,
                 "peer_attention": self.attn}
        cuda = self.device.type == "cuda"
        try:
            rows = [self.tokenizer.encode(prompts.measured(i), add_special_tokens=False).ids for i in range(n)]
            if cfg.warmup:
                warm = [self.tokenizer.encode(prompts.warmup(i), add_special_tokens=False).ids for i in range(batch)]
                self._generate(warm, 2)
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            mark = sampler.mark()
            t0 = time.perf_counter()
            records: list[RequestRecord] = []
            for b in range(cfg.peer_batches):
                chunk = rows[b * batch:(b + 1) * batch]
                start, times, made = self._generate(chunk, point.osl)
                end = time.perf_counter()
                for j, r in enumerate(chunk):
                    rec = RequestRecord(b * batch + j, start - t0, end - t0, input_tokens=len(r),
                                        finish_reason="length" if made >= point.osl else "stop")
                    for t in times[:made]:
                        rec.add(t - t0, 1)
                    records.append(rec)
            window = time.perf_counter() - t0
            gpu = sampler.summary(mark, t0 + window)
            if cuda:
                gpu["torch_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            return point_result("hf-peer", point.isl, point.osl, point.concurrency, records, window, gpu,
                                cfg.price_per_gpu_hour, **extra)
        except Exception as e:  # OOM at a large batch: record it, go on with the next point
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            return point_result("hf-peer", point.isl, point.osl, point.concurrency, [], None, None,
                                cfg.price_per_gpu_hour, error=_error_text(e), **extra)


def run(cfg: BenchConfig, points: list[Point], sampler: NvmlSampler, log: Log, on_result: Callable[[dict], None],
        device: str) -> list[dict]:
    results = []
    try:
        checkpoint = cfg.peer_checkpoint or default_checkpoint(cfg.engine_dir)
        peer = HFPeer(checkpoint, device, log)
    except Exception as e:
        log(f"peer: cannot load the HF model: {_error_text(e)}")
        for p in points:
            r = point_result("hf-peer", p.isl, p.osl, p.concurrency, [], None, None, cfg.price_per_gpu_hour,
                             error=f"peer did not load: {_error_text(e)}")
            results.append(r)
            on_result(r)
        return results
    done: dict[tuple[int, int, int], dict] = {}  # (isl, osl, batch) -> result: a capped batch runs once
    try:
        for p in points:
            batch = min(p.concurrency, cfg.peer_max_batch)
            same = done.get((p.isl, p.osl, batch))
            if same is not None and same["status"] != "error":
                r = dict(same, concurrency=p.concurrency, same_as_concurrency=same["concurrency"])
                log(f"peer: {p.label}: batch {batch} as at concurrency {same['concurrency']}, not run again")
                results.append(r)
                on_result(r)
                continue
            log(f"peer: {p.label}, batch {batch} x {cfg.peer_batches}")
            r = peer.run_point(cfg, p, sampler)
            done[(p.isl, p.osl, batch)] = r
            log("peer:   " + brief(r))
            results.append(r)
            on_result(r)
    finally:
        peer.close()
    return results
