"""The batched sampler against its definition: greedy = argmax; top-k / top-p keep exactly the tokens
they should; draws follow the (temperature-scaled, truncated) distribution; seeded rows are the same
in any batch; logprobs are those of the distribution the token was drawn from."""

import pytest
import torch

from qwentrt.config import SamplingParams
from qwentrt.engine.sampler import Sampler
from qwentrt.engine.sequence import Sequence

V = 50


def seq(i: int = 0, seed: int | None = None, **params) -> Sequence:
    s = Sequence(i, f"r{i}", [1, 2, 3], SamplingParams(**params))
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


def draws(logits_row: torch.Tensor, n: int, **params) -> torch.Tensor:
    sampler = Sampler([0], torch.device("cpu"))
    logits = logits_row.repeat(n, 1)
    tokens, _ = sampler(logits.clone(), [seq(i, **params) for i in range(n)])
    return torch.tensor(tokens)


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(6, V)
    seqs = [seq(0, temperature=0.0), seq(1, temperature=0.7), seq(2, temperature=0.0, logprobs=True),
            seq(3, temperature=1.0, top_k=1), seq(4, temperature=1.3, top_p=1e-6), seq(5, temperature=0.0)]
    tokens, lps = Sampler([0], torch.device("cpu"))(logits.clone(), seqs)
    best = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 3, 4, 5)] == [best[i] for i in (0, 2, 3, 4, 5)]
    assert lps[2] == pytest.approx(float(torch.log_softmax(logits[2], -1)[best[2]]), rel=1e-5)
    assert lps[0] == 0.0  # logprobs not asked for


def test_top_k_and_top_p_keep_exactly_their_tokens():
    row = torch.randn(V) * 2
    order = row.argsort(descending=True)
    assert set(draws(row, 400, temperature=5.0, top_k=3).tolist()) <= set(order[:3].tolist())
    probs = row.softmax(-1)[order]
    keep = int((probs.cumsum(0) - probs <= 0.6).sum())  # smallest prefix reaching 0.6
    got = set(draws(row, 400, temperature=1.0, top_p=0.6).tolist())
    assert got <= set(order[:keep].tolist()) and len(got) >= min(keep, 2)


def test_draws_follow_the_distribution():
    row = torch.randn(8) * 1.5
    n = 20000
    sampler = Sampler([0], torch.device("cpu"))
    tokens, _ = sampler(row.repeat(n, 1) * 1.0, [seq(i, temperature=2.0) for i in range(n)])
    freq = torch.bincount(torch.tensor(tokens), minlength=8).float() / n
    expected = (row / 2.0).softmax(-1)
    assert (freq - expected).abs().max() < 0.02


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, V)
    alone, _ = Sampler([0], torch.device("cpu"))(logits[2:3].clone(), [seq(9, seed=123, temperature=1.0)])
    mixed, _ = Sampler([0], torch.device("cpu"))(
        logits.clone(), [seq(0, temperature=1.0), seq(1, temperature=0.0), seq(9, seed=123, temperature=1.0),
                         seq(3, temperature=0.5, top_p=0.9)])
    assert mixed[2] == alone[0]


def test_sampled_logprobs_are_those_of_the_truncated_distribution():
    row = torch.randn(V)
    s = seq(0, temperature=0.5, top_k=5, logprobs=True)
    tokens, lps = Sampler([0], torch.device("cpu"))(row[None].clone(), [s])
    top = (row / 0.5).topk(5)
    probs = top.values.softmax(-1)
    expected = float(probs[top.indices.tolist().index(tokens[0])].log())
    assert lps[0] == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_min_tokens_holds_exactly_each_rows_stop_tokens(layout):
    """Rows short of min_tokens (counting tokens in flight) lose their end token and their own stop tokens,
    whatever the mix in the batch; every other logit, and every other row, is left as it was (also when the
    logits are a strided view, e.g. rows of a wider buffer)."""
    torch.manual_seed(0)
    logits = torch.randn(7, V) if layout == "contiguous" else torch.randn(7, V + 5)[:, :V]
    short = seq(0, min_tokens=5, max_tokens=9)
    short_own = seq(1, min_tokens=5, max_tokens=9, stop_token_ids=[7, 11])
    short_other = seq(2, min_tokens=5, max_tokens=9, stop_token_ids=[13])
    done = seq(3, min_tokens=2, max_tokens=9, stop_token_ids=[7])
    done.output_ids = [4, 5]
    in_flight = seq(4, min_tokens=2, max_tokens=9)  # one token known, one in flight: reaches min_tokens
    in_flight.output_ids, in_flight.num_pending = [4], 1
    free = seq(5, max_tokens=9, stop_token_ids=[7])
    short_own_again = seq(6, min_tokens=3, max_tokens=9, stop_token_ids=[7, 11])
    seqs = [short, short_own, short_other, done, in_flight, free, short_own_again]
    sampler = Sampler([0, 1], torch.device("cpu"))
    out = logits.clone() if layout == "contiguous" else torch.randn(7, V + 5)[:, :V].copy_(logits)
    assert out.is_contiguous() == (layout == "contiguous")
    sampler._hold_stop_tokens(out, seqs)
    held = {0: [0, 1], 1: [0, 1, 7, 11], 2: [0, 1, 13], 6: [0, 1, 7, 11]}
    expect = logits.clone()
    for row, ids in held.items():
        expect[row, ids] = float("-inf")
    assert torch.equal(out, expect)
    tokens, _ = sampler(logits.clone(), seqs)  # greedy: a held row never picks a stop token
    for row, ids in held.items():
        assert tokens[row] not in ids


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_sample_never_synchronizes_the_stream(kind):
    """Async scheduling needs `sample` to queue its work without waiting for the GPU, also with min_tokens held
    on most rows (what every served request sends) and mixed stop tokens. A synchronizing call makes the
    engine's steps serial (session 7's `logits[rows, ids] = float("-inf")` copied a host scalar up: every served
    step waited for the GPU)."""
    dev = torch.device("cuda")
    vocab = 151936
    sampler = Sampler([151645, 151643], dev)
    params = dict(temperature=0.0) if kind == "greedy" else dict(temperature=0.8, top_p=0.9, top_k=40)
    seqs = [seq(i, max_tokens=100, min_tokens=100 if i % 4 else 0, stop_token_ids=[7] if i % 3 == 0 else [],
                **params) for i in range(64)]
    logits = torch.randn(64, vocab, device=dev)
    sampler.sample(logits.clone(), seqs)  # first call: stop ids cached, kernels loaded
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # keep the GPU busy, so that a synchronizing call would also show in time
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens, _ = sampler.sample(logits.clone(), seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i, token in enumerate(tokens.tolist()):
        if seqs[i].params.min_tokens:
            assert token not in {151645, 151643, *seqs[i].params.stop_token_ids}
