"""The prefill graphs' padded forward (prefill_graphs.py) against the eager prefill: on the CPU the padded forward
runs eagerly (what a graph replays); the captured graphs on CUDA: tests/test_gpu_engine.py."""

import torch

from qwentrt.config import SamplingParams
from qwentrt.engine.prefill_graphs import BUCKETS, prefill_buckets

from .test_engine import make, random_prompts

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)


def test_buckets_cover_every_prompt_up_to_the_limit():
    assert prefill_buckets(2048)[-1] == 2048 and prefill_buckets(100) == [32, 64, 96]
    assert prefill_buckets(BUCKETS[0] - 1) == []
    sizes = prefill_buckets(2048)
    for n in range(1, 2049):  # the bucket a prompt of n replays wastes at most a third of it (or 31 rows)
        b = next(s for s in sizes if s >= n)
        assert b - n < max(32, b / 3)


def _spy(runner):
    used = []
    run = runner.prefill_graphs.run

    def spy(input_ids, table):
        used.append(len(input_ids))
        return run(input_ids, table)
    runner.prefill_graphs.run = spy
    return used


def test_padded_prefill_matches_the_eager_prefill(bf16_engine):
    """Whole prompts of several lengths (inside a bucket, on a bucket's edge, past a page) through the padded
    forward give the eager engine's tokens and log-probabilities; a prompt past the largest bucket, a prompt with
    a cached prefix and a prompt arriving while another decodes run eagerly."""
    prompts = random_prompts([5, 32, 33, 70, 100])
    eager = make(bf16_engine, prefill_graphs=False)
    padded = make(bf16_engine, prefill_graphs=True, max_num_tokens=100)
    assert padded.runner.prefill_graphs.sizes == [32, 64, 96]
    used = _spy(padded.runner)
    for p in prompts:
        a = eager.generate([p], GREEDY)[0]
        b = padded.generate([p], GREEDY)[0]
        assert b.token_ids == a.token_ids
        assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4)
    assert used == [5, 32, 33, 70]  # 100 tokens: no bucket; eager
    # the same prompt again: its prefix is cached, the rest runs eagerly
    again = padded.generate([prompts[3]], GREEDY)[0]
    assert again.num_cached_tokens > 0 and used == [5, 32, 33, 70]
    # two prompts in one step: eager; their tokens are each one's alone
    both = padded.generate(prompts[:2], GREEDY)
    assert [o.token_ids for o in both] == [eager.generate([p], GREEDY)[0].token_ids for p in prompts[:2]]
    assert used == [5, 32, 33, 70]
    assert padded.stats()["kv_pages_used"] == 0


def test_capture_falls_back_to_fewer_tokens_then_to_eager():
    """Out of GPU memory at capture the graphs cover fewer tokens (halving), then none; any other capture failure
    leaves prefills eager. Each with a warning; the engine starts either way."""
    import warnings

    from qwentrt.engine.prefill_graphs import capture_fitting

    class Fake:
        def __init__(self, t):
            self.max_tokens = t
    tried = []

    def capture(fits):
        def run(graphs):
            tried.append(graphs.max_tokens)
            if graphs.max_tokens > fits:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return run
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = capture_fitting(Fake, 2048, capture(600))
    assert got.max_tokens == 512 and tried == [2048, 1024, 512]
    assert any("do not fit" in str(x.message) and "trying 1024" in str(x.message) for x in w)
    tried.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert capture_fitting(Fake, 2048, capture(0)) is None
    assert tried == [2048, 1024, 512, 256, 128, 64, 32]  # (each the largest bucket within half the last)
    assert "smallest bucket" in str(w[-1].message)

    def broken(graphs):
        raise RuntimeError("operation not permitted when stream is capturing")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert capture_fitting(Fake, 2048, broken) is None
    assert "not captured (RuntimeError: operation not permitted" in str(w[-1].message)
