"""What the CUDA-graph decode path decides on the host (the graphs themselves: tests/test_gpu_engine.py)."""

from qwentrt.engine.cuda_graphs import graph_batch_sizes, pad_tables
from qwentrt.engine.model_runner import ModelRunner
from qwentrt.engine.scheduler import ScheduledSeq


def test_graph_batch_sizes_cover_every_batch_up_to_the_limit():
    for limit in (1, 3, 16, 100, 256):
        sizes = graph_batch_sizes(limit)
        assert sizes == sorted(set(sizes)) and sizes[-1] == limit and sizes[0] == 1
        for n in range(1, limit + 1):  # the graph a batch of n replays wastes at most 15 padding rows
            assert next(s for s in sizes if s >= n) - n < 16
    assert graph_batch_sizes(256)[:5] == [1, 2, 4, 8, 16]


def test_batches_run_decodes_first_and_tables_are_padded():
    class Seq:
        def __init__(self, i):
            self.seq_id = i
    batch = [ScheduledSeq(Seq(0), 7), ScheduledSeq(Seq(1), 1), ScheduledSeq(Seq(2), 30), ScheduledSeq(Seq(3), 1)]
    assert [item.seq.seq_id for item in ModelRunner.order(batch)] == [1, 3, 0, 2]
    table = pad_tables([[4, 5], [9], [1, 2, 3]])
    assert table.tolist() == [[4, 5, 0], [9, 0, 0], [1, 2, 3]] and str(table.dtype) == "int32"


def test_staged_block_tables_are_written_incrementally_and_stay_exact():
    import random

    import torch

    from qwentrt.engine.cuda_graphs import TableRows
    rows = TableRows(4, 8)
    rng = random.Random(0)
    live = [[rng.randrange(100)] for _ in range(4)]
    for _ in range(200):
        i = rng.randrange(4)
        if rng.random() < 0.2:
            live[i] = [rng.randrange(100) for _ in range(rng.randint(1, 3))]  # another sequence in this row
        elif len(live[i]) < 8:
            live[i].append(rng.randrange(100))  # the table grew by a page
        batch = rng.sample(live, rng.randint(1, 4))  # rows change hands between steps
        rows.fill(batch)
        for row, table in enumerate(batch):
            assert rows.tables[row, :len(table)].tolist() == table
    ids = torch.tensor([5, ~1, 7, ~0])
    from qwentrt.engine.inflight import resolve_placeholders
    assert resolve_placeholders(ids, torch.tensor([40, 41])).tolist() == [5, 41, 7, 40]


def test_capture_sizes_captures_largest_first_into_one_pool(monkeypatch):
    """The capture loop both graph kinds share (decode, prefill), with torch's CUDA-graph calls faked on the CPU:
    a warm-up run then a capture per size, largest first, every capture after the first in the first's pool (or
    in the pool given)."""
    import contextlib

    import torch

    from qwentrt.engine.cuda_graphs import capture_sizes
    events = []

    class FakeGraph:
        def pool(self):
            return ("pool", id(self))

    @contextlib.contextmanager
    def fake_graph(graph, pool=None):
        events.append(("capture", pool))
        yield
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    graphs = {}
    pool = capture_sizes([1, 8, 4], lambda size: events.append(("run", size)), graphs)
    assert sorted(graphs) == [1, 4, 8] and pool == graphs[8].pool()
    assert events == [("run", 8), ("capture", None), ("run", 8), ("run", 4), ("capture", pool), ("run", 4),
                      ("run", 1), ("capture", pool), ("run", 1)]
    events.clear()
    capture_sizes([32], lambda size: None, {}, pool="shared")
    assert events == [("capture", "shared")]
