"""What a bench run leaves: results.json (environment, options, every point's summary and raw per-request
records, comparisons), report.md (the table a person reads) and PNG plots (throughput and latency vs
concurrency, one line per ISL/OSL and mode)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qwentrt.bench.stats import ratio

GiB = 1 << 30
MODE_ORDER = {"engine": 0, "served": 1, "hf-peer": 2}
PLOTS = ("throughput.png", "latency.png")


# ---- comparisons ---------------------------------------------------------------------------------
def _key(r: dict) -> tuple[int, int, int]:
    return r["isl"], r["osl"], r["concurrency"]


def _fig(r: dict | None, *path: str) -> float | None:
    if r is None or r.get("status") == "error" or r.get("summary") is None:
        return None
    v = r["summary"]
    for p in path:
        v = v.get(p) if isinstance(v, dict) else None
    return v


def comparisons(points: list[dict]) -> list[dict]:
    """Per ISL/OSL/C: served / engine throughput, and qwentrt (engine, served) / HF peer: output tok/s
    (> 1 is faster), TTFT p50 and ITL p50 (< 1 is faster)."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in points:
        by.setdefault(_key(r), {})[r["mode"]] = r
    out = []
    for key in sorted(by):
        modes = by[key]
        eng, srv, peer = modes.get("engine"), modes.get("served"), modes.get("hf-peer")
        row = {"isl": key[0], "osl": key[1], "concurrency": key[2],
               "served_over_engine_tok_s": ratio(_fig(srv, "output_tok_s"), _fig(eng, "output_tok_s"))}
        for name, mine in (("engine", eng), ("served", srv)):
            row[f"{name}_over_peer_tok_s"] = ratio(_fig(mine, "output_tok_s"), _fig(peer, "output_tok_s"))
            row[f"{name}_over_peer_ttft_p50"] = ratio(_fig(mine, "ttft_ms", "p50"), _fig(peer, "ttft_ms", "p50"))
            row[f"{name}_over_peer_itl_p50"] = ratio(_fig(mine, "itl_ms", "p50"), _fig(peer, "itl_ms", "p50"))
        row["peer_batch"] = peer.get("peer_batch") if peer else None
        out.append(row)
    return out


# ---- JSON ------------------------------------------------------------------------------------------
def _clean(x):
    """JSON without NaN/inf (strict parsers reject them): those become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(doc: dict, out: Path) -> Path:
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    # compact: one line per point's records would otherwise be one line per token
    tmp.write_text(json.dumps(_clean(doc), allow_nan=False, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


# ---- Markdown --------------------------------------------------------------------------------------
def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _peak_gib(r: dict) -> float | None:
    gpu = r.get("gpu") or {}
    b = gpu.get("mem_used_peak_bytes") or gpu.get("torch_peak_allocated_bytes")
    return None if b is None else b / GiB


COLUMNS = ["mode", "ISL", "OSL", "C", "ok/req", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
           "TPOT p50 ms", "E2E p50 ms", "out tok/s", "req/s", "peak GiB", "W", "J/tok", "yuan/Mtok", "vs peer"]


def table(points: list[dict], comps: list[dict] | None = None) -> str:
    """The Markdown table: one row per point and mode. `vs peer`: qwentrt's output tok/s over the HF
    peer's at the same point (for the peer's own rows: its batch)."""
    comps = {(c["isl"], c["osl"], c["concurrency"]): c for c in (comps or comparisons(points))}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for r in sorted(points, key=lambda r: (r["isl"], r["osl"], MODE_ORDER.get(r["mode"], 9), r["concurrency"])):
        s = r.get("summary") or {}
        gpu = r.get("gpu") or {}
        comp = comps.get(_key(r), {})
        if r["mode"] == "hf-peer":
            vs = f"batch {r.get('peer_batch')}"
        else:
            x = comp.get(f"{r['mode']}_over_peer_tok_s")
            vs = "-" if x is None else f"{x:.2f}x"
        if r["status"] == "error":
            cells = [r["mode"], str(r["isl"]), str(r["osl"]), str(r["concurrency"]), "error"]
            cells += ["-"] * (len(COLUMNS) - 5)
        else:
            def lat(k: str, p: str, s: dict = s) -> str:
                return _f((s.get(k) or {}).get(p))

            cells = [r["mode"], str(r["isl"]), str(r["osl"]), str(r["concurrency"]), f"{s['ok']}/{s['requests']}",
                     lat("ttft_ms", "p50"), lat("ttft_ms", "p99"), lat("itl_ms", "p50"), lat("itl_ms", "p99"),
                     lat("tpot_ms", "p50"), lat("e2e_ms", "p50"), _f(s.get("output_tok_s")),
                     _f(s.get("requests_s"), ".2f"),
                     _f(_peak_gib(r), ".2f"), _f(gpu.get("power_avg_w"), ".0f"), _f(gpu.get("j_per_token"), ".3f"),
                     _f(r.get("cost_per_mtok"), ".2f"), vs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    env, opts = doc["environment"], doc["options"]
    points, comps = doc["points"], doc["comparisons"]
    eng = env.get("engine") or {}
    gpu = env.get("gpu") or {}
    lines = [
        f"# qwentrt bench: {eng.get('name', '?')}",
        "",
        f"- date: {env['date']}",
        f"- device: {env['device']}" + (f", {gpu.get('name')} (driver {gpu.get('driver')})" if gpu.get("name") else ""),
        f"- software: qwentrt {env['qwentrt']}, torch {env['torch']} (CUDA {env.get('cuda')}), "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}, Python {env['python']}",
        f"- engine: {eng.get('path')}: {eng.get('weights')} weights, {eng.get('kv_cache')} KV cache, "
        f"max batch {eng.get('max_batch_size')}, {eng.get('max_num_tokens')} tokens/step, KV capacity "
        f"{eng.get('kv_capacity_tokens')} tokens, built for {eng.get('target')}",
        f"- command: `{env['command']}`",
        "- greedy, exact-length synthetic prompts, outputs forced to OSL tokens, closed loop (C in flight); "
        + (f"requests issued for {opts['duration_s']:g} s per point, then drained"
           if opts.get("duration_s") else f"requests per point: {opts.get('num_requests') or 'max(2*C, 8)'}")
        + f"; warmup rounds per point: {opts['warmup']}; throughput over first submission to last finish",
        f"- cost: {opts['price_per_gpu_hour']:g} yuan per GPU-hour (an assumption: --price-per-gpu-hour) / output "
        "tok/s; peak GiB: GPU memory used (NVML, the whole GPU) when known, else torch's peak allocation; W and "
        "J/tok: NVML over the measured window; ITL: every gap between tokens (an output carrying k tokens after "
        "a gap g counts k gaps of g/k); TPOT: per request, (last token - first token) / (tokens - 1)",
        "",
        table(points, comps),
    ]
    if any(c.get("served_over_engine_tok_s") is not None or c.get("engine_over_peer_tok_s") is not None
           for c in comps):
        lines += ["", "## Ratios", "",
                  "| ISL | OSL | C | served/engine tok/s | engine/peer tok/s | engine/peer TTFT p50 | "
                  "engine/peer ITL p50 | served/peer tok/s | peer batch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in comps:
            if all(v is None for k, v in c.items() if k.endswith(("_tok_s", "_p50"))):
                continue
            lines.append(f"| {c['isl']} | {c['osl']} | {c['concurrency']} | {_f(c['served_over_engine_tok_s'], '.2f')} "
                         f"| {_f(c['engine_over_peer_tok_s'], '.2f')} | {_f(c['engine_over_peer_ttft_p50'], '.2f')} "
                         f"| {_f(c['engine_over_peer_itl_p50'], '.2f')} | {_f(c['served_over_peer_tok_s'], '.2f')} "
                         f"| {_f(c['peer_batch'], 'd')} |")
    sides = [r for r in points if r.get("engine_side")]
    if sides:
        lines += ["", "## Where the engine's time went", "",
                  "The engine's own counters over each point (qwentrt/bench/server_side.py; served: the server's "
                  "metrics port): tokens it generated and steps it ran per second, tokens sent in responses (served), "
                  "and a step's time split into waiting for the device, host work in step(), and time outside step() "
                  "(the loop around it); host CPU ms below host ms: the stepping thread was held up (GIL, CPU "
                  "quota). Engine tok/s near engine-direct while a served client sees less: the responses lag; "
                  "engine tok/s low: the engine steps slower.",
                  "", "| mode | ISL | OSL | C | client tok/s | engine tok/s | sent tok/s | steps/s | ms/step | "
                  "wait ms | host ms | host CPU ms | loop ms | running | waiting |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sides:
            v = r["engine_side"]
            lines.append(f"| {r['mode']} | {r['isl']} | {r['osl']} | {r['concurrency']} | "
                         f"{_f((r.get('summary') or {}).get('output_tok_s'))} | {_f(v.get('engine_tok_s'))} | "
                         f"{_f(v.get('sent_tok_s'))} | {_f(v.get('engine_steps_s'))} | {_f(v.get('ms_per_step'), '.2f')} | "
                         f"{_f(v.get('wait_ms_per_step'), '.2f')} | {_f(v.get('host_ms_per_step'), '.2f')} | "
                         f"{_f(v.get('host_cpu_ms_per_step'), '.2f')} | "
                         f"{_f(v.get('loop_ms_per_step'), '.2f')} | {_f(v.get('mean_running'))} | "
                         f"{_f(v.get('mean_waiting'))} |")
    errors = [r for r in points if r.get("error") or r["status"] != "ok"]
    notes = [n for n in doc.get("notes", []) if n]
    if errors or notes:
        lines += ["", "## Notes", ""]
        for r in errors:
            kinds = (r.get("summary") or {}).get("error_kinds") or {}
            why = r.get("error") or ", ".join(f"{k} x{v}" for k, v in kinds.items())
            lines.append(f"- {r['mode']} ISL {r['isl']} / OSL {r['osl']} / C {r['concurrency']}: {r['status']}: {why}")
        lines += [f"- {n}" for n in notes]
    pa = doc.get("perf_analyzer")
    if pa:
        lines += ["", "## perf_analyzer", ""]
        if pa.get("runs"):
            for run in pa["runs"]:
                lines.append(f"- ISL {run['isl']} / OSL {run['osl']}: " + (
                    run["error"] if "error" in run else f"{len(run['rows'])} rows, CSVs in {run['dir']}"))
        else:
            lines.append(f"- {pa.get('status')}: {pa.get('error')}")
    if doc.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in doc["plots"]]
    return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------------------------------
def _series(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in points:
        if r["status"] != "error" and r.get("summary"):
            out.setdefault(f"{r['mode']} {r['isl']}/{r['osl']}", []).append(r)
    return {k: sorted(v, key=lambda r: r["concurrency"]) for k, v in sorted(out.items())}


def _concurrency_axis(ax, levels: list[int]) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    if levels:
        ax.set_xticks(levels)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("concurrency")


def plots(points: list[dict], out: Path) -> list[str]:
    """throughput.png (output tok/s vs C) and latency.png (TTFT p50 and ITL p50 vs C); returns file names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = _series(points)
    levels = sorted({r["concurrency"] for rs in series.values() for r in rs})
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, rs in series.items():
        ax.plot([r["concurrency"] for r in rs], [r["summary"]["output_tok_s"] or 0 for r in rs], marker="o",
                label=name)
    _concurrency_axis(ax, levels)
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs concurrency (mode ISL/OSL)")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0])

    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate((("ttft_ms", "TTFT p50 (ms)"), ("itl_ms", "ITL p50 (ms)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, rs in series.items():
            xs = [r["concurrency"] for r in rs if r["summary"][key]["p50"] is not None]
            ys = [r["summary"][key]["p50"] for r in rs if r["summary"][key]["p50"] is not None]
            ax.plot(xs, ys, marker="o", label=name)
        _concurrency_axis(ax, levels)
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs concurrency")
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[1])
    return list(PLOTS)


def write_all(doc: dict, out: Path) -> dict[str, Path]:
    """results.json, the PNGs and report.md; a plotting failure is noted, not fatal."""
    try:
        doc["plots"] = plots(doc["points"], out)
    except Exception as e:
        doc["plots"] = []
        doc.setdefault("notes", []).append(f"plots failed: {type(e).__name__}: {e}")
    files = {"json": write_json(doc, out)}
    md = out / "report.md"
    md.write_text(markdown(doc), encoding="utf-8")
    files["markdown"] = md
    return files
