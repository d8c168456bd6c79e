"""`qwentrt bench`: the grid through each mode in turn (engine-direct, then served, then the HF peer,
each alone on the GPU), the environment beside the figures, results.json rewritten after every point
so that a run cut short keeps what it measured, then report.md and the plots."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Callable

from qwentrt.bench import report
from qwentrt.bench.grid import BenchConfig
from qwentrt.bench.nvml import NvmlSampler

Log = Callable[[str], None]


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def engine_summary(engine_dir: Path) -> dict:
    from qwentrt.config import EngineConfig

    try:
        e = EngineConfig.load(engine_dir)
    except Exception as exc:
        return {"name": Path(engine_dir).name, "path": str(engine_dir), "error": str(exc)}
    return {"name": Path(engine_dir).name, "path": str(Path(engine_dir).resolve()), "weights": e.weights.format,
            "group_size": e.weights.group_size, "kv_cache": e.kv_cache.dtype,
            "kv_capacity_tokens": e.kv_cache.capacity_tokens, "kv_block_size": e.kv_cache.block_size,
            "max_batch_size": e.limits.max_batch_size, "max_num_tokens": e.limits.max_num_tokens,
            "max_seq_len": e.limits.max_seq_len, "target": f"{e.target.name} (sm {e.target.compute_capability})",
            "checkpoint": e.build.checkpoint, "built": e.build.created, "qwentrt_version": e.build.qwentrt_version,
            "parameters": e.model.num_parameters(), "layers": e.model.num_hidden_layers,
            "hidden_size": e.model.hidden_size}


def environment(cfg: BenchConfig, device: str, sampler: NvmlSampler) -> dict:
    import torch

    from qwentrt import __version__

    gpu = {"name": sampler.gpu_name, "driver": sampler.driver, "memory_total_bytes": sampler.memory_total,
           "nvml_note": sampler.note}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        gpu.update(name=gpu["name"] or props.name, compute_capability=f"{props.major}.{props.minor}",
                   memory_total_bytes=gpu["memory_total_bytes"] or props.total_memory)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "qwentrt": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "tritonclient": _version("tritonclient"),
        "numpy": _version("numpy"),
        "device": device,
        "gpu": gpu,
        "engine": engine_summary(cfg.engine_dir),
        "command": shlex.join(cfg.command or ["qwentrt", *sys.argv[1:]]),
        # served: the qwen3 model's engine_process: auto follows this variable (1 / 0), else a process on CUDA
        "QWENTRT_ENGINE_PROCESS": os.environ.get("QWENTRT_ENGINE_PROCESS", ""),
    }


def default_out(engine_dir: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("build") / "bench" / f"{Path(engine_dir).resolve().name}-{stamp}"


def run_bench(cfg: BenchConfig, log: Log = lambda m: print(m, file=sys.stderr), allow_gpu_mismatch: bool = False
              ) -> tuple[dict, dict[str, Path]]:
    """Run every mode over the grid; returns (the results document, the files written)."""
    import torch

    from qwentrt.bench import runner_engine, runner_served

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.device = device
    out = Path(cfg.out or default_out(cfg.engine_dir))
    out.mkdir(parents=True, exist_ok=True)
    cfg.out = out
    sampler = NvmlSampler(device, cfg.nvml_interval_s).start()
    points = cfg.points()
    doc = {"format": "qwentrt-bench/1", "environment": environment(cfg, device, sampler),
           "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
           "points": [], "comparisons": [], "perf_analyzer": None,
           "notes": [sampler.note] if sampler.note else []}
    log(f"bench: {len(points)} points x modes {', '.join(cfg.modes + (['hf-peer'] if cfg.peer else []))} "
        f"on {device}; results in {out}")

    def on_result(r: dict) -> None:
        doc["points"].append(r)
        doc["comparisons"] = report.comparisons(doc["points"])
        report.write_json(doc, out)

    try:  # Ctrl-C (or `timeout -s INT`) stops the run; what was measured is still reported
        if "engine" in cfg.modes:
            runner_engine.run(cfg, points, sampler, log, on_result, allow_gpu_mismatch)
        if "served" in cfg.modes:
            _, doc["perf_analyzer"] = runner_served.run(cfg, points, sampler, log, on_result, device, out)
        elif cfg.perf_analyzer:
            doc["perf_analyzer"] = {"status": "skipped",
                                    "error": "perf_analyzer needs the server: --mode served or both"}
        if cfg.peer == "hf":
            from qwentrt.bench import peer_hf

            peer_hf.run(cfg, points, sampler, log, on_result, device)
    except KeyboardInterrupt:
        log("bench: interrupted; writing what was measured")
        doc["notes"].append("interrupted before the end: points not listed were not measured")
    finally:
        sampler.close()
        doc["comparisons"] = report.comparisons(doc["points"])
        files = report.write_all(doc, out)
    return doc, files
