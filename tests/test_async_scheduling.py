"""Async scheduling (qwentrt/engine/inflight.py) changes when the host learns a step's tokens, never what
they are: a mixed workload gives exactly the synchronous engine's outputs (tokens, texts, finish reasons,
token counts, logprobs), with staggered arrivals, greedy and seeded sampling, stop strings and stop
tokens, max_tokens, logprobs, penalties / multi-token bad words / a grammar (steps run synchronously),
aborts mid-stream, prefix cache hits, and preemption in a small KV pool."""

import json

import pytest
import torch

from qwentrt.config import SamplingParams
from qwentrt.engine.engine import LLMEngine

from .conftest import DEVICE

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["n"], "additionalProperties": False}


def make(engine_dir, async_scheduling, **kw):
    return LLMEngine(engine_dir, device=DEVICE, dtype=torch.float32, allow_gpu_mismatch=True,
                     async_scheduling=async_scheduling, **kw)


def drive(eng, arrivals, abort_after):
    """Steps the engine to the end; arrivals: step index -> [(request id, kwargs)]; abort_after: request id
    -> abort once that many output tokens were returned. -> request id -> (tokens, text, finish reason,
    num_output_tokens, logprobs, cum_logprob)."""
    got: dict[str, dict] = {}
    step = 0
    while step <= max(arrivals) or eng.has_unfinished():
        for rid, kw in arrivals.get(step, []):
            eng.add_request(rid, **kw)
            got[rid] = {"tokens": [], "text": "", "lps": [], "final": None}
        outs = eng.step()
        for out in outs:
            g = got[out.request_id]
            assert g["final"] is None, f"{out.request_id}: an output after its final one"
            g["tokens"] += out.token_ids
            g["text"] += out.text
            g["lps"] += out.logprobs
            assert out.num_output_tokens == len(g["tokens"])
            if out.finished:
                g["final"] = out
        for rid, n in abort_after.items():
            if got.get(rid) and got[rid]["final"] is None and len(got[rid]["tokens"]) >= n:
                got[rid]["final"] = eng.abort(rid)
        eng.block_manager.check_invariants()
        step += 1
        assert step < 2000
    assert eng.stats()["kv_pages_used"] == 0 and not eng._seqs
    return {rid: (g["tokens"], g["text"], g["final"].finish_reason, g["final"].num_output_tokens, g["lps"],
                  g["final"].cum_logprob) for rid, g in got.items()}


_base = {}


def workload(eng):
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(0, 151000, (n,), generator=g).tolist()

    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # A stop string and a stop token that do occur: from a greedy run of the prompt they are cut from.
    text_prompt = "The weather today is"
    if "base" not in _base:
        _base["base"] = eng.generate([text_prompt], greedy)[0]
    base = _base["base"]
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 3]
    shared = ids(70)  # two full pages: later requests hit them in the prefix cache
    arrivals = {
        0: [("greedy-long", dict(prompt_ids=ids(60), params=greedy)),
            ("seeded", dict(prompt_ids=ids(45), params=SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9,
                                                                        top_k=50, seed=11, ignore_eos=True,
                                                                        logprobs=True))),
            ("shared-a", dict(prompt_ids=shared + ids(3), params=greedy))],
        1: [("stop-string", dict(prompt=text_prompt, params=SamplingParams(max_tokens=24, temperature=0.0,
                                                                           ignore_eos=True, stop=[stop]))),
            ("stop-token", dict(prompt=text_prompt, params=SamplingParams(max_tokens=24, temperature=0.0,
                                                                          stop_token_ids=[base.token_ids[5]])))],
        2: [("short", dict(prompt_ids=ids(20), params=SamplingParams(max_tokens=1, temperature=0.0))),
            ("abort-me", dict(prompt_ids=ids(30), params=greedy)),
            ("min-tokens", dict(prompt=text_prompt, params=SamplingParams(max_tokens=12, temperature=0.0, min_tokens=8,
                                                                          stop_token_ids=[base.token_ids[0]])))],
        4: [("penalty", dict(prompt_ids=ids(25), params=SamplingParams(max_tokens=12, temperature=0.0,
                                                                       repetition_penalty=1.3,
                                                                       frequency_penalty=0.5, ignore_eos=True))),
            ("seeded-2", dict(prompt_ids=ids(33), params=SamplingParams(max_tokens=16, temperature=0.8, seed=3,
                                                                          ignore_eos=True, logprobs=True)))],
        7: [("shared-b", dict(prompt_ids=shared + ids(5), params=greedy)),
            ("abort-early", dict(prompt_ids=ids(40), params=greedy))],
        12: [("guided", dict(prompt="JSON:", params=SamplingParams(max_tokens=24, temperature=1.0, seed=2,
                                                                   guide_type="json_schema",
                                                                   guide=json.dumps(SCHEMA)))),
             ("shared-c", dict(prompt_ids=shared + ids(2), params=SamplingParams(max_tokens=12, temperature=0.0,
                                                                                 ignore_eos=True, logprobs=True)))],
    }
    return arrivals, {"abort-me": 7, "abort-early": 1}, stop


@pytest.mark.parametrize("kv", [dict(num_blocks=64), dict(num_blocks=6, max_num_tokens=40, max_prefill_chunk=24)],
                         ids=["roomy", "preempting"])
def test_async_scheduling_gives_the_synchronous_outputs(bf16_engine, kv):
    runs = {}
    for mode in (False, True):
        eng = make(bf16_engine, mode, **kv)
        arrivals, abort_after, stop = workload(eng)
        hits_before = eng.stats()["prefix_cache_hit_tokens"]
        runs[mode] = drive(eng, arrivals, abort_after)
        stats = eng.stats()
        assert stats["prefix_cache_hit_tokens"] > hits_before
        if kv["num_blocks"] < 64:
            assert stats["preemptions"] > 0
    sync, overlapped = runs[False], runs[True]
    assert sync.keys() == overlapped.keys()
    for rid in sync:
        tokens, text, reason, n, lps, cum = sync[rid]
        assert overlapped[rid][:4] == (tokens, text, reason, n), rid
        # logprobs: the same up to float rounding (a preempted request's recompute may run in another batch)
        assert overlapped[rid][4] == pytest.approx(lps, rel=1e-5, abs=1e-5), rid
        assert overlapped[rid][5] == pytest.approx(cum, rel=1e-5, abs=1e-4), rid
    # the workload does what it says
    assert sync["stop-string"][2] == "stop" and stop not in sync["stop-string"][1]
    assert sync["stop-token"][2] == "stop" and sync["greedy-long"][2] == "length"
    assert sync["abort-me"][2] == "abort" and sync["abort-me"][3] == 7
    assert sync["abort-early"][2] == "abort" and sync["short"][3] == 1
    assert sync["min-tokens"][3] >= 8 and sync["guided"][2] in ("stop", "length")
    assert any(lp != 0.0 for lp in sync["seeded"][4])


def test_async_scheduling_is_on_by_default_and_can_be_turned_off(bf16_engine, monkeypatch):
    assert make(bf16_engine, None, num_blocks=16).async_scheduling
    monkeypatch.setenv("QWENTRT_ASYNC_SCHEDULING", "0")
    assert not make(bf16_engine, None, num_blocks=16).async_scheduling
    assert make(bf16_engine, True, num_blocks=16).async_scheduling


def test_a_step_overlaps_the_previous_one_and_never_returns_an_extra_token(bf16_engine):
    eng = make(bf16_engine, True, num_blocks=32)
    eng.add_request("a", prompt_ids=list(range(100, 140)), params=SamplingParams(max_tokens=3, temperature=0.0,
                                                                               ignore_eos=True))
    assert eng.step() == []  # the prefill is launched; its token comes with the next step
    seq = eng._seqs["a"]
    assert seq.num_pending == 1 and eng.has_unfinished()
    outs = eng.step()  # launches the decode of the token in flight, then returns that token
    assert [len(o.token_ids) for o in outs] == [1] and seq.num_pending == 1
    outs = eng.step()
    assert [o.num_output_tokens for o in outs] == [2]
    outs = eng.step()  # the third token was the last (max_tokens): nothing more was launched for it
    assert [(o.num_output_tokens, o.finish_reason) for o in outs] == [(3, "length")]
    assert not eng.has_unfinished() and eng.stats()["kv_pages_used"] == 0


def test_a_fault_in_a_launch_still_returns_the_step_in_flight(bf16_engine, monkeypatch):
    eng = make(bf16_engine, True, num_blocks=32)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    eng.add_request("a", prompt_ids=list(range(100, 140)), params=params)
    eng.step()
    eng.step()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(eng.runner, "run", broken)
    outs = eng.step()
    # the token of the step in flight first, then the failed step's error
    assert [(len(o.token_ids), o.finish_reason) for o in outs] == [(1, None), (0, "error")]
    assert "simulated kernel failure" in outs[1].error and outs[1].num_output_tokens == 2
    assert not eng.has_unfinished() and eng.stats()["kv_pages_used"] == 0


def test_a_step_the_device_fails_fails_its_requests_and_repeated_failures_are_counted(bf16_engine, monkeypatch):
    from qwentrt.engine.inflight import InFlightStep
    eng = make(bf16_engine, True, num_blocks=32)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    eng.add_request("a", prompt_ids=list(range(100, 140)), params=params)
    eng.step()
    real = InFlightStep.result

    def failed(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(InFlightStep, "result", failed)
    outs = eng.step()  # the launch succeeds; the step before it turns out to have failed on the device
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "error")] and "illegal memory" in outs[0].error
    assert not eng.has_unfinished() and eng.stats()["kv_pages_used"] == 0
    for i in range(3):  # a device that stays broken: every step fails, and the count keeps growing
        eng.add_request(f"b{i}", prompt_ids=list(range(200, 240)), params=params)
        eng.step()
        eng.step()
    assert eng.consecutive_step_faults >= 3
    monkeypatch.setattr(InFlightStep, "result", real)
    assert eng.generate([list(range(300, 340))], params)[0].finish_reason == "length"
    assert eng.consecutive_step_faults == 0
