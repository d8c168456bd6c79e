"""The `qwentrt` command: synth, build, info (more commands arrive with the runtime and serving)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from qwentrt import __version__
from qwentrt.errors import QwentrtError

GiB = 1 << 30


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qwentrt")
def main() -> None:
    """Serve Qwen3-4B-Instruct-2507 on one GPU: build an engine, serve it behind Triton."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "4b"]), default="tiny", show_default=True,
              help="4b: Qwen3-4B-Instruct-2507's exact shape; tiny: a CI-sized model with the same tokenizer.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(out: Path, preset: str, seed: int, dtype: str, force: bool) -> None:
    """Write a HF-format Qwen3 checkpoint with seeded random weights and the real Qwen3 tokenizer."""
    import torch

    from qwentrt.synth import synth as _synth

    try:
        _synth(out, preset, seed, getattr(torch, dtype), force=force)
    except QwentrtError as e:
        _fail(e)
    click.echo(f"wrote {out} (preset {preset}, seed {seed})")


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Engine folder to write (e.g. build/qwen3-4b).")
@click.option("--weights", type=click.Choice(["int4-awq", "bf16"]), default="int4-awq", show_default=True)
@click.option("--kv-cache", type=click.Choice(["fp8-e4m3", "bf16"]), default="fp8-e4m3", show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help="AWQ group size.")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="Calibration text (.txt, documents split by <|doc|> lines or blank lines) or .jsonl "
                   "({'text': ...} or {'messages': [...]}). Default: the set shipped with qwentrt.")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--awq-grid", type=int, default=20, show_default=True, help="Grid points of the AWQ scale search.")
@click.option("--max-batch-size", type=int, default=None,
              help="Requests decoded together per step. Default: 512 when the GPU budget is 40 GiB or more, else 256.")
@click.option("--max-num-tokens", type=int, default=8192, show_default=True, help="Tokens per engine step.")
@click.option("--max-seq-len", type=int, default=32768, show_default=True)
@click.option("--kv-block-size", type=int, default=32, show_default=True, help="Tokens per KV page.")
@click.option("--target", default="auto", show_default=True,
              help="GPU to build for: auto (the GPU here, else sm_89), sm_80, sm_86, sm_89, sm_90.")
@click.option("--gpu-memory", "gpu_memory", type=float, default=None,
              help="GPU memory budget in GiB for the KV plan [default: the target card's memory].")
@click.option("--device", default="auto", show_default=True, help="Where calibration runs: auto, cpu, cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tune", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Time the W4A16 kernel configs on this GPU and keep the winners (auto: when it is the target).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(checkpoint: str, out: Path, weights: str, kv_cache: str, group_size: int, calib: str | None,
          calib_samples: int, calib_seqlen: int, awq_grid: int, max_batch_size: int, max_num_tokens: int,
          max_seq_len: int, kv_block_size: int, target: str, gpu_memory: float | None, device: str, seed: int,
          tune: str, force: bool, quiet: bool) -> None:
    """Build an engine from CHECKPOINT (a HF folder or hub id): INT4 AWQ weights, FP8 KV scales,
    batching limits, the KV capacity for the GPU budget, and kernel configs for the target GPU."""
    from qwentrt.config import BuildConfig
    from qwentrt.engine.build import build as _build

    options = BuildConfig(weights=weights, kv_cache=kv_cache, group_size=group_size, calib=calib,
                          calib_samples=calib_samples, calib_seqlen=calib_seqlen, awq_grid=awq_grid,
                          max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                          kv_block_size=kv_block_size, target=target, gpu_memory_gib=gpu_memory, device=device,
                          seed=seed, tune=tune)
    log = (lambda *_: None) if quiet else (lambda m: click.echo(m, err=True))
    try:
        engine = _build(checkpoint, out, options, force=force, progress=not quiet, log=log)
    except QwentrtError as e:
        _fail(e)
    click.echo(_summary(out, engine))


def _summary(folder: Path, engine) -> str:
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
    kv = engine.kv_cache
    lines = [
        f"engine: {folder}",
        f"  weights     {engine.weights.format} ({engine.weights.source}), {engine.weights.bytes / GiB:.2f} GiB",
        f"  kv cache    {kv.dtype}, {kv.num_blocks} pages x {kv.block_size} = {kv.capacity_tokens:,} tokens "
        f"({kv.bytes_per_token:,} bytes/token)",
        f"  limits      batch {engine.limits.max_batch_size}, {engine.limits.max_num_tokens} tokens/step, "
        f"seq {engine.limits.max_seq_len}",
        f"  target      {engine.target.name} (sm {engine.target.compute_capability}), budget "
        f"{engine.memory.budget / GiB:.1f} GiB",
        f"  build       {engine.build.wall_s:.1f} s on {engine.build.device}, peak GPU "
        f"{engine.build.peak_gpu_memory_bytes / GiB:.2f} GiB, {size / GiB:.2f} GiB on disk",
    ]
    for group, s in (engine.build.awq or {}).items():
        lines.append(f"  awq {group:<8} output error {s['mean_loss_vs_rtn']:.3f} x round-to-nearest")
    return "\n".join(lines)


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print engine.json.")
def info(engine_dir: Path, as_json: bool) -> None:
    """Describe an engine folder."""
    from qwentrt.config import EngineConfig

    try:
        engine = EngineConfig.load(engine_dir)
    except QwentrtError as e:
        _fail(e)
    click.echo(engine.to_json() if as_json else _summary(engine_dir, engine))


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--chat/--raw", default=True, show_default=True,
              help="Render PROMPT as a user message with the chat template, or feed it as it is.")
@click.option("--system", default=None, help="A system message (with --chat).")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--top-p", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Constrain the output to this JSON schema (a file).")
@click.option("--ignore-eos", is_flag=True, help="Generate max-tokens tokens whatever the model says.")
@click.option("--device", default=None, help="cuda or cpu [default: cuda when there is one].")
@click.option("--allow-gpu-mismatch", is_flag=True, help="Run an engine built for another compute capability.")
def generate(engine_dir: Path, prompt: str, chat: bool, system: str | None, max_tokens: int, temperature: float,
             top_p: float, top_k: int, seed: int | None, stop: tuple[str, ...], json_schema: str | None,
             ignore_eos: bool, device: str | None, allow_gpu_mismatch: bool) -> None:
    """Stream a completion of PROMPT from an engine to the terminal."""
    import time

    from qwentrt.config import SamplingParams
    from qwentrt.engine.engine import LLMEngine

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=list(stop), ignore_eos=ignore_eos)
    if json_schema:
        params.guide_type, params.guide = "json_schema", Path(json_schema).read_text(encoding="utf-8")
    try:
        engine = LLMEngine(engine_dir, device=device, allow_gpu_mismatch=allow_gpu_mismatch)
        messages = None
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
        start = time.perf_counter()
        engine.add_request("cli", None if chat else prompt, params, messages=messages)
        first = None
        out = None
        while engine.has_unfinished():
            for out in engine.step():
                if first is None:
                    first = time.perf_counter()
                click.echo(out.text, nl=False)
                if out.error:
                    raise QwentrtError(f"generation failed: {out.error}")
    except (QwentrtError, ValueError) as e:
        _fail(e)
    end = time.perf_counter()
    click.echo()
    if out is not None:
        rate = (out.num_output_tokens - 1) / (end - first) if out.num_output_tokens > 1 and end > first else 0.0
        click.echo(f"[{out.num_prompt_tokens} prompt + {out.num_output_tokens} output tokens, "
                   f"finish: {out.finish_reason}, TTFT {1000 * (first - start):.0f} ms, {rate:.1f} tok/s]", err=True)


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("model_repository"), show_default=True)
@click.option("--device", default=None, help="cuda or cpu for the qwen3 model [default: cuda when there is one].")
@click.option("--max-queue-size", type=int, default=None,
              help="Requests waiting beyond this get UNAVAILABLE [default: 4 x max batch size].")
def repo(engine_dir: Path, out: Path, device: str | None, max_queue_size: int | None) -> None:
    """Write a Triton model repository (qwen3, json_validator, ensemble) for an engine."""
    from qwentrt.serving.repository import write_repository

    try:
        write_repository(engine_dir, out, device=device, max_queue_size=max_queue_size)
    except QwentrtError as e:
        _fail(e)
    click.echo(f"wrote {out}: qwen3 (decoupled), json_validator, ensemble")


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("model_repository"), show_default=True,
              help="Model repository to serve (written from ENGINE_DIR when that is given).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--device", default=None, help="cuda or cpu [default: cuda when there is one].")
@click.option("--api-key", envvar="QWENTRT_API_KEY", default=None,
              help="Key for Triton's restricted protocols (repository, config, shared memory, logging, trace); "
                   "clients send it as header qwentrt-key (HTTP) or triton-grpc-protocol-qwentrt-key (gRPC); "
                   "without it those protocols are locked. [env QWENTRT_API_KEY]")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="tritonserver's log [default: REPO/../tritonserver.log].")
@click.option("--timeout", "timeout_s", type=float, default=600, show_default=True,
              help="Seconds to wait for the models to be ready.")
def serve(engine_dir: Path | None, repo_dir: Path, host: str, grpc_port: int, http_port: int, metrics_port: int,
          device: str | None, api_key: str | None, log_file: Path | None, timeout_s: float) -> None:
    """Serve an engine with tritonserver until Ctrl-C."""
    import signal
    import time

    from qwentrt.serving.repository import write_repository
    from qwentrt.serving.server import ServerOptions, TritonServer

    try:
        if engine_dir is not None:
            write_repository(engine_dir, repo_dir, device=device)
        elif not (repo_dir / "qwen3" / "config.pbtxt").is_file():
            raise QwentrtError(f"{repo_dir} is not a qwentrt model repository: pass the engine folder "
                               "(qwentrt serve build/NAME) or write one with `qwentrt repo`")
        log_file = log_file or repo_dir.resolve().parent / "tritonserver.log"
        server = TritonServer(ServerOptions(repo_dir, grpc_port, http_port, metrics_port, host,
                                            restricted_key=api_key), log_file=log_file)
        click.echo(f"starting tritonserver ({server.binary.executable}), log: {log_file}", err=True)
        server.start()
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            server.wait_ready(("qwen3", "json_validator"), timeout_s)
            click.echo(f"ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}\n"
                       f"models: qwen3 (streaming), ensemble, json_validator. Ctrl-C stops.")
            while not stop["now"] and server.process.poll() is None:
                time.sleep(0.5)
            if server.process.poll() is not None and not stop["now"]:
                raise QwentrtError(f"tritonserver exited with code {server.process.returncode}; see {log_file}")
        except KeyboardInterrupt:
            pass
        finally:
            click.echo("stopping tritonserver (draining in-flight requests)...", err=True)
            server.stop()
    except QwentrtError as e:
        _fail(e)


@main.command()
@click.argument("url", default="127.0.0.1:8001")
@click.option("-n", "--requests", "n", type=int, default=64, show_default=True)
@click.option("-c", "--concurrency", type=int, default=8, show_default=True)
@click.option("--prompt-len", type=int, default=128, show_default=True, help="Synthetic prompt tokens.")
@click.option("--output-len", type=int, default=128, show_default=True, help="Output tokens (forced).")
@click.option("--prompt-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Prompts, one per line (instead of synthetic ones).")
@click.option("--model", default="qwen3", show_default=True)
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds per request.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the summary and every request's record here.")
def probe(url: str, n: int, concurrency: int, prompt_len: int, output_len: int, prompt_file: Path | None,
          model: str, timeout: float, json_out: Path | None) -> None:
    """Send N streamed requests at concurrency C to URL; print TTFT, ITL, end-to-end (p50/p90/p99), tokens/s."""
    import asyncio
    import dataclasses
    import time

    from qwentrt.client.probes import format_table, run_probe, summarize

    if n < 1 or concurrency < 1 or prompt_len < 1 or output_len < 1:
        _fail(QwentrtError("-n, -c, --prompt-len and --output-len must be positive"))
    prompts = None
    if prompt_file is not None:
        prompts = [line for line in prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            _fail(QwentrtError(f"--prompt-file {prompt_file}: no prompts in it"))
    start = time.perf_counter()
    records = asyncio.run(run_probe(url, n, concurrency, prompt_len, output_len, prompts, model, timeout=timeout))
    summary = summarize(records, time.perf_counter() - start)
    click.echo(format_table(summary))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"url": url, "requests": n, "concurrency": concurrency,
                                        "prompt_len": prompt_len, "output_len": output_len, "summary": summary,
                                        "records": [dataclasses.asdict(r) for r in records]}, indent=1,
                                       default=float), encoding="utf-8")
    if all(r.error for r in records):
        sys.exit(1)


@main.command("perf-analyzer")
@click.option("--url", default="127.0.0.1:8001", show_default=True, help="tritonserver's gRPC address.")
@click.option("--concurrency", default="1,16,64", show_default=True, help="Comma-separated concurrencies.")
@click.option("--prompt-len", type=int, default=1000, show_default=True, help="Prompt tokens.")
@click.option("--output-len", type=int, default=1000, show_default=True, help="Output tokens (forced).")
@click.option("--measurement-ms", type=int, default=20000, show_default=True)
@click.option("--api-key", envvar="QWENTRT_API_KEY", default=None,
              help="The server's restricted-protocol key (`qwentrt serve --api-key`): perf_analyzer reads the "
                   "model config, a restricted group. [env QWENTRT_API_KEY]")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/perf_analyzer"), show_default=True)
def perf_analyzer_cmd(url: str, concurrency: str, prompt_len: int, output_len: int, measurement_ms: int,
                      api_key: str | None, out_dir: Path) -> None:
    """Run perf_analyzer (streaming, gRPC) against the qwen3 model over a concurrency sweep; keeps its CSVs."""
    from qwentrt.bench import perf_analyzer

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
        if not levels or min(levels) < 1:
            raise QwentrtError(f"--concurrency: positive integers separated by commas, got {concurrency!r}")
        rows = perf_analyzer.run(url, out_dir, levels, prompt_len, output_len, measurement_ms=measurement_ms,
                                 api_key=api_key)
    except ValueError:
        _fail(QwentrtError(f"--concurrency: positive integers separated by commas, got {concurrency!r}"))
    except QwentrtError as e:
        _fail(e)
    click.echo(f"{'concurrency':>11}  {'responses/s':>12}  {'p50 latency ms':>14}")
    for row in rows:
        rps = row.get("Inferences/Second", "?")
        p50 = row.get("p50 latency", "")
        click.echo(f"{row['concurrency']:>11}  {rps:>12}  {(float(p50) / 1000 if p50 else float('nan')):>14.1f}")
    click.echo(f"CSVs and logs in {out_dir}")


def _command_line(ctx: click.Context) -> list[str]:
    """The command as typed (sys.argv), or as click parsed it when invoked otherwise (e.g. from tests)."""
    from click.core import ParameterSource

    if ctx.info_name in sys.argv:
        return ["qwentrt", *sys.argv[sys.argv.index(ctx.info_name):]]
    words = ["qwentrt", ctx.info_name or "bench"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None):
            if getattr(param, "is_flag", False):
                words += [param.opts[-1]] if value else []
            else:
                words += [w for v in (value if param.multiple else [value]) for w in (param.opts[-1], str(v))]
    return words


def _key_values(items: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise QwentrtError(f"{option}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--isl", multiple=True, default=("1000",), show_default=True,
              help="Prompt lengths in tokens (repeatable or comma list; with --osl they form the grid).")
@click.option("--osl", multiple=True, default=("1000",), show_default=True,
              help="Output lengths in tokens, forced (ignore_eos). Equal-length lists pair up, else all combinations.")
@click.option("-c", "--concurrency", multiple=True, default=("1,16,64,256",), show_default=True,
              help="Requests kept in flight (repeatable or comma list).")
@click.option("-n", "--num-requests", type=int, default=None,
              help="Measured requests per point [max(2 x concurrency, 8)].")
@click.option("--duration", "duration_s", type=float, default=None,
              help="Seconds per point to keep issuing requests (instead of --num-requests); in-flight ones finish.")
@click.option("--point-timeout", "point_timeout_s", type=float, default=900, show_default=True,
              help="Seconds after which a point's unfinished requests are aborted (recorded as such).")
@click.option("--mode", type=click.Choice(["engine", "served", "both", "none"]), default="both", show_default=True,
              help="engine: LLMEngine in this process; served: tritonserver + gRPC client; both: one then the "
                   "other; none: only the peer (with --peer).")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Warmup rounds per point (concurrency-many requests of the point's ISL, 8 output tokens).")
@click.option("--peer", type=click.Choice(["hf"]), default=None,
              help="Also run HF transformers generate (bf16, eager) on the same weights, and report the ratios.")
@click.option("--peer-checkpoint", default=None,
              help="The peer's checkpoint [the one engine.json records as the engine's source].")
@click.option("--peer-max-batch", type=int, default=64, show_default=True,
              help="The peer's batch is the concurrency capped by this.")
@click.option("--peer-batches", type=int, default=1, show_default=True, help="Timed peer batches per point.")
@click.option("--price-per-gpu-hour", type=float, default=20.0, show_default=True,
              help="Yuan per GPU-hour for the cost per million output tokens (an assumed rental price).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [build/bench/ENGINE-NAME-TIMESTAMP].")
@click.option("--perf-analyzer", "use_perf_analyzer", is_flag=True,
              help="Also run perf_analyzer's sweep against the served engine (when perf_analyzer is on PATH).")
@click.option("--perf-analyzer-ms", type=int, default=20000, show_default=True, help="Its measurement window.")
@click.option("--device", default=None, help="cuda, cuda:N or cpu [cuda when there is one].")
@click.option("--allow-gpu-mismatch", is_flag=True, help="Run an engine built for another compute capability.")
@click.option("--server-timeout", "server_timeout_s", type=float, default=600, show_default=True,
              help="Seconds to wait for tritonserver's models to be ready.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the synthetic prompts.")
@click.option("--served-param", "served_params", multiple=True, metavar="KEY=VALUE",
              help="A qwen3 model parameter for the served runs (repeatable), e.g. max_responses_per_s=3000.")
@click.option("--quick", is_flag=True,
              help="A smoke test: ISL 16, OSL 8, concurrency 1,4 (unless given), for CI and a first look.")
@click.pass_context
def bench(ctx: click.Context, engine_dir: Path, isl: tuple[str, ...], osl: tuple[str, ...],
          concurrency: tuple[str, ...], num_requests: int | None, duration_s: float | None, point_timeout_s: float,
          mode: str, warmup: int, peer: str | None, peer_checkpoint: str | None, peer_max_batch: int,
          peer_batches: int, price_per_gpu_hour: float, out: Path | None, use_perf_analyzer: bool,
          perf_analyzer_ms: int, device: str | None, allow_gpu_mismatch: bool, server_timeout_s: float, seed: int,
          served_params: tuple[str, ...], quick: bool) -> None:
    """Measure ENGINE_DIR over an ISL/OSL x concurrency grid: TTFT, ITL, end-to-end latency, tokens/s,
    GPU memory, power, J/token and cost, engine-direct and served, optionally against the HF peer.
    Writes results.json, report.md and PNG plots to --out; prints the table."""
    from click.core import ParameterSource

    from qwentrt.bench.grid import QUICK, BenchConfig, pair_lengths, parse_ints
    from qwentrt.bench.report import table
    from qwentrt.bench.run import run_bench

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)

    try:
        isls = parse_ints(isl, "--isl") if not (quick and not given("isl")) else QUICK["isl"]
        osls = parse_ints(osl, "--osl") if not (quick and not given("osl")) else QUICK["osl"]
        levels = (parse_ints(concurrency, "--concurrency") if not (quick and not given("concurrency"))
                  else QUICK["concurrency"])
        cfg = BenchConfig(engine_dir=engine_dir, lengths=pair_lengths(isls, osls), concurrency=levels,
                          num_requests=num_requests, duration_s=duration_s, point_timeout_s=point_timeout_s,
                          mode=mode, warmup=warmup, peer=peer, peer_checkpoint=peer_checkpoint,
                          peer_max_batch=peer_max_batch, peer_batches=peer_batches,
                          price_per_gpu_hour=price_per_gpu_hour, out=out, perf_analyzer=use_perf_analyzer,
                          perf_analyzer_ms=perf_analyzer_ms, device=device, server_timeout_s=server_timeout_s,
                          seed=seed, served_params=_key_values(served_params, "--served-param"),
                          command=_command_line(ctx))
        doc, files = run_bench(cfg, log=lambda m: click.echo(m, err=True), allow_gpu_mismatch=allow_gpu_mismatch)
    except QwentrtError as e:
        _fail(e)
    click.echo(table(doc["points"], doc["comparisons"]))
    click.echo(f"\n{files['markdown']}  {files['json']}", err=True)
    if doc["points"] and all(r["status"] == "error" for r in doc["points"]):
        click.echo("every point failed: see the notes in report.md", err=True)
        sys.exit(1)



@main.command()
@click.argument("target")
@click.option("--minutes", type=float, default=10, show_default=True)
@click.option("-c", "--concurrency", type=int, default=64, show_default=True)
@click.option("--prompt-tokens", default="16,2048", show_default=True, help="Prompt length range (log-uniform).")
@click.option("--output-tokens", default="16,512", show_default=True, help="max_tokens range.")
@click.option("--metrics-url", default=None, help="Triton metrics of a server at URL [default: port 8002 of its host].")
@click.option("--server-pid", type=int, default=None, help="tritonserver's pid, for its memory (a server at URL).")
@click.option("--device", default=None, help="Where an ENGINE is served: cuda or cpu [default: cuda when there is one].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Report file [default: build/soak/soak-<time>.json].")
@click.option("--seed", type=int, default=0, show_default=True)
def soak(target: str, minutes: float, concurrency: int, prompt_tokens: str, output_tokens: str,
         metrics_url: str | None, server_pid: int | None, device: str | None, json_out: Path | None,
         seed: int) -> None:
    """Hold a mixed load (varied lengths, cancelled streams, guided JSON) on TARGET for N minutes; report
    errors by code, TTFT p99 drift and memory growth. TARGET: a server's gRPC HOST:PORT, or an engine
    folder (served here by tritonserver on free loopback ports for the soak)."""
    import contextlib
    import time

    from qwentrt.bench.soak import SoakConfig, passed, run_soak, summary, write

    def pair(text: str, name: str) -> tuple[int, int]:
        try:
            lo, hi = (int(v) for v in text.split(","))
            assert 1 <= lo <= hi
            return lo, hi
        except (ValueError, AssertionError):
            raise click.BadParameter(f"{text!r}: expected LOW,HIGH with 1 <= LOW <= HIGH", param_hint=name) from None

    cfg = SoakConfig(minutes=minutes, concurrency=concurrency, prompt_tokens=pair(prompt_tokens, "--prompt-tokens"),
                     output_tokens=pair(output_tokens, "--output-tokens"), seed=seed)
    json_out = json_out or Path("build/soak") / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        with contextlib.ExitStack() as stack:
            url = target
            if (Path(target) / "engine.json").is_file():
                from qwentrt.serving.repository import write_repository
                from qwentrt.serving.server import ServerOptions, TritonServer, free_ports

                root = json_out.parent / (json_out.stem + "-server")
                repo = write_repository(target, root / "repo", device=device)
                server = TritonServer(ServerOptions(repo, *free_ports(3)),
                                      log_file=root / "tritonserver.log")
                log(f"serving {target} (log {root / 'tritonserver.log'})")
                server.start()
                stack.callback(server.stop)
                server.wait_ready(("qwen3", "json_validator"), 900)
                url, metrics_url, server_pid = server.grpc_url, server.metrics_url, server.process.pid
            elif metrics_url is None:
                metrics_url = f"http://{target.rsplit(':', 1)[0]}:8002/metrics"
            result = run_soak(url, cfg, metrics_url=metrics_url, server_pid=server_pid, log=log)
            result["command"] = " ".join(["qwentrt", "soak", *sys.argv[2:]])
    except QwentrtError as e:
        _fail(e)
    write(result, json_out)
    click.echo(summary(result))
    click.echo(str(json_out), err=True)
    if not passed(result):
        sys.exit(1)


if __name__ == "__main__":
    main()
