"""The engine API on the CPU (tiny model, float32): batching does not change results, sampling options
do what they say, pages are freed, guided JSON validates."""

import asyncio
import json

import pytest
import torch

from qwentrt.config import SamplingParams
from qwentrt.engine.async_engine import AsyncEngine
from qwentrt.engine.engine import LLMEngine, RequestError

from .conftest import DEVICE

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def make(engine_dir, **kw):
    kw.setdefault("num_blocks", 64)
    return LLMEngine(engine_dir, device=DEVICE, dtype=torch.float32, allow_gpu_mismatch=True, **kw)


def random_prompts(lengths):
    return [torch.randint(0, 151000, (n,)).tolist() for n in lengths]


def run_alone(engine_dir, prompts, params):
    eng = make(engine_dir)
    return [eng.generate([p], params)[0].token_ids for p in prompts]


def test_batching_staggering_chunking_and_preemption_do_not_change_greedy_outputs(bf16_engine):
    prompts = random_prompts([28, 60, 30, 62, 25])  # each crosses a page boundary while decoding
    alone = run_alone(bf16_engine, prompts, GREEDY)
    # 6 pages of 32 tokens cannot hold them all (12 by the end): preemption must happen.
    eng = make(bf16_engine, num_blocks=6, max_num_tokens=24, max_prefill_chunk=16)
    results: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or eng.has_unfinished():
        if pending and steps % 2 == 0:  # a new arrival every other step
            i, p = pending.pop(0)
            eng.add_request(f"r{i}", params=GREEDY, prompt_ids=p)
        for out in eng.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
        eng.block_manager.check_invariants()
        steps += 1
        assert steps < 500
    assert eng.scheduler.num_preemptions > 0
    assert [results[f"r{i}"] for i in range(len(prompts))] == alone
    assert eng.stats()["kv_pages_used"] == 0


def test_seeded_sampling_is_reproducible_in_any_batch(bf16_engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = random_prompts([30])[0]
    eng = make(bf16_engine)
    alone = eng.generate([prompt], params)[0].token_ids
    others = random_prompts([25, 40])
    batch = eng.generate([others[0], prompt, others[1]],
                         [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True), params,
                          SamplingParams(max_tokens=5, temperature=0.7, seed=9, ignore_eos=True)])
    assert batch[1].token_ids == alone
    other_seed = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50,
                                                       seed=4321, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_stop_strings_end_ids_bad_words_and_lengths(bf16_engine):
    eng = make(bf16_engine)
    prompt = "The weather today is"
    base = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert base.finish_reason == "length" and base.num_output_tokens == 24
    text = base.text
    assert len(text) > 10
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and text.startswith(cut.text)
    assert cut.text == text[: text.index(stop)]
    end = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                stop_token_ids=[base.token_ids[3]]))[0]
    assert end.finish_reason == "stop" and end.token_ids == base.token_ids[: base.token_ids.index(base.token_ids[3]) + 1]
    first = eng.tokenizer.decode([base.token_ids[0]])
    if first.strip():
        banned = eng.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                       bad_words=[first]))[0]
        assert banned.token_ids[0] != base.token_ids[0]


def test_abort_frees_pages_and_prefix_cache_hits_are_counted(bf16_engine):
    eng = make(bf16_engine)
    shared = random_prompts([70])[0]
    eng.add_request("a", params=GREEDY, prompt_ids=shared + [5, 6])
    eng.step()
    assert eng.stats()["kv_pages_used"] > 0
    out = eng.abort("a")
    assert out.finished and out.finish_reason == "abort"
    assert eng.stats()["kv_pages_used"] == 0 and not eng.has_unfinished()
    assert eng.abort("a") is None
    before = eng.stats()["prefix_cache_hit_tokens"]
    again = eng.generate([shared + [7, 8]], GREEDY)[0]
    assert eng.stats()["prefix_cache_hit_tokens"] - before == 64  # two full pages of the shared prefix
    assert again.num_cached_tokens == 64
    assert again.token_ids == make(bf16_engine, enable_prefix_caching=False).generate([shared + [7, 8]], GREEDY)[0].token_ids


def test_schema_guided_output_validates(bf16_engine):
    import jsonschema
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}
    eng = make(bf16_engine)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=7, guide_type="json_schema", guide=json.dumps(schema))
    outs = eng.generate(["Give me a person as JSON:"] * 3, params)
    for out in outs:
        assert out.finish_reason == "stop", out
        jsonschema.validate(json.loads(out.text), schema)
    with pytest.raises(RequestError, match="invalid JSON schema"):
        eng.add_request("bad", "x", SamplingParams(guide_type="json_schema", guide='{"type": "nope"}'))
    with pytest.raises(RequestError, match="not valid JSON"):
        eng.add_request("bad", "x", SamplingParams(guide_type="json_schema", guide="{"))


def test_chat_messages_and_bad_requests(bf16_engine):
    eng = make(bf16_engine)
    seq = eng.add_request("chat", messages=[{"role": "user", "content": "你好"}], params=GREEDY)
    assert eng.tokenizer.decode(seq.prompt_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    eng.abort("chat")
    cases = [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="x", params=SamplingParams(max_tokens=0)), "max_tokens"),
        (dict(prompt="x", params=SamplingParams(max_tokens=10**6)), "max_tokens: 1000000 exceeds the limit"),
        (dict(prompt="x", params=SamplingParams(temperature=float("nan"))), "temperature"),
        (dict(prompt="x", params=SamplingParams(top_p=0.0)), "top_p: must be in \\(0, 1\\]"),
        (dict(prompt="x", params=SamplingParams(top_k=-1)), "top_k"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "unknown role 'robot'"),
        (dict(messages="hello"), "messages: expected a non-empty list"),
        (dict(prompt_ids=[10**7]), "token ids must be within"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(RequestError, match=needle):
            eng.add_request("bad", **kwargs)
    assert not eng.has_unfinished() and eng.stats()["kv_pages_used"] == 0


def test_async_generate_streams_and_cancel_frees_pages(bf16_engine):
    eng = make(bf16_engine)
    full = eng.generate(["Streaming test"], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    aeng = AsyncEngine(eng)

    async def main():
        deltas = []
        async for out in aeng.generate("Streaming test", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)):
            deltas.append(out)
        gen = aeng.generate("Cancel me", SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # the client goes away mid-stream
        return deltas

    try:
        deltas = asyncio.run(main())
        assert "".join(d.text for d in deltas) == full.text and deltas[-1].finished
        assert deltas[-1].finish_reason == "length"
        for _ in range(50):
            if aeng.stats()["kv_pages_used"] == 0:
                break
            import time
            time.sleep(0.05)
        assert aeng.stats()["kv_pages_used"] == 0 and aeng.stats()["running"] == 0
    finally:
        aeng.shutdown()


def test_min_tokens_masks_end_tokens(bf16_engine):
    eng = make(bf16_engine)
    prompt = random_prompts([12])[0]
    first = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0].token_ids[0]
    # Make the greedy first token an end token: without min_tokens it stops at once...
    early = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first]))[0]
    assert early.finish_reason == "stop" and early.token_ids == [first]
    # ...with min_tokens=3 it cannot end before the third token.
    held = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first],
                                                 min_tokens=3))[0]
    assert held.num_output_tokens >= 3 and first not in held.token_ids[:2]


def test_a_fault_in_a_step_fails_its_requests_and_the_engine_goes_on(bf16_engine, monkeypatch):
    eng = make(bf16_engine)
    eng.add_request("doomed", "hello", GREEDY)
    original = eng.runner.run

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(eng.runner, "run", broken)
    outs = eng.step()
    assert [o.finish_reason for o in outs] == ["error"] and "simulated kernel failure" in outs[0].error
    assert eng.stats()["kv_pages_used"] == 0 and not eng.has_unfinished()
    monkeypatch.setattr(eng.runner, "run", original)
    assert eng.generate(["hello"], GREEDY)[0].finish_reason == "length"


def test_generate_cli_streams(bf16_engine):
    from click.testing import CliRunner

    from qwentrt.cli import main
    args = ["generate", str(bf16_engine), "Tell me about 秋天", "--max-tokens", "8", "--ignore-eos", "--seed", "1",
            "--device", DEVICE, "--allow-gpu-mismatch"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "8 output tokens, finish: length" in result.output
    bad = CliRunner().invoke(main, args + ["--top-p", "1.5"])
    assert bad.exit_code == 2 and "top_p: must be in (0, 1]" in bad.output


def test_add_abort_and_stats_never_wait_for_the_step_running_now(bf16_engine):
    """The loop holds its lock for a whole step. add / abort / stats must not take it (they queue, or read
    a snapshot), else a burst of requests waits one step each. Holding the lock here stands for a step
    that never ends: with a lock-taking add() the calls below would hang."""
    import threading

    aeng = AsyncEngine(make(bf16_engine))
    outputs = []
    try:
        done = threading.Event()

        def calls():
            aeng.add("r1", outputs.append, prompt="Hello", params=GREEDY)
            aeng.stats()
            aeng.abort("r1")
            aeng.add("r2", outputs.append, prompt="Hello again", params=GREEDY)
            done.set()

        with aeng._lock:  # the loop is "inside a step"
            threading.Thread(target=calls, daemon=True).start()
            assert done.wait(timeout=60), "add/stats/abort waited for the engine's step"
            assert aeng.stats()["waiting"] == 2  # queued for the next step
        # once the step ends, the queue is applied: r1 aborted before it ran, r2 runs to the end
        for _ in range(600):
            if outputs and outputs[-1].finished and outputs[-1].request_id == "r2":
                break
            import time
            time.sleep(0.1)
        assert [o.request_id for o in outputs if o.finished] == ["r2"]
        assert all(o.request_id == "r2" for o in outputs)
    finally:
        aeng.shutdown()
