"""The runtime on a CUDA GPU in its serving precision (bf16 compute, INT4 AWQ, FP8 KV)."""

import json
from dataclasses import replace

import pytest
import torch

from qwentrt.config import SamplingParams
from qwentrt.engine.build import build
from qwentrt.engine.engine import LLMEngine

from .conftest import FAST
from .test_model import rel

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_engine(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-cuda"
    build(tiny_ckpt, out, replace(FAST, device="cuda", target="auto"), progress=False, log=lambda *_: None)
    return out


def logits_of(engine: LLMEngine, ids):
    from qwentrt.engine.scheduler import ScheduledSeq
    from qwentrt.engine.sequence import Sequence
    seq = Sequence(0, "r", ids, SamplingParams())
    engine.block_manager.allocate(0, ids)
    input_ids, meta = engine.runner.prepare([ScheduledSeq(seq, len(ids))], engine.block_manager)
    meta.logits_indices = torch.arange(len(ids), device=input_ids.device)
    out = engine.runner.model.compute_logits(engine.runner.model(input_ids, meta, engine.runner.kv_caches))
    engine.block_manager.free(0)
    return out.cpu()


def test_bf16_serving_precision_tracks_the_float32_reference(cuda_engine):
    ids = torch.randint(0, 151000, (100,)).tolist()
    fast = logits_of(LLMEngine(cuda_engine, device="cuda", num_blocks=64), ids)
    ref = logits_of(LLMEngine(cuda_engine, device="cpu", dtype=torch.float32, num_blocks=64,
                              allow_gpu_mismatch=True), ids)
    assert rel(fast, ref) < 3e-2, rel(fast, ref)


def test_generate_and_guided_json_on_cuda(cuda_engine):
    import jsonschema
    eng = LLMEngine(cuda_engine, device="cuda", num_blocks=256)
    outs = eng.generate(["hello"] * 8, SamplingParams(max_tokens=32, temperature=0.8, seed=3, ignore_eos=True))
    assert all(o.num_output_tokens == 32 for o in outs)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "s": {"type": "string", "maxLength": 5}},
              "required": ["n", "s"], "additionalProperties": False}
    out = eng.generate(["JSON:"], SamplingParams(max_tokens=64, temperature=1.0, seed=1, guide_type="json_schema",
                                                 guide=json.dumps(schema)))[0]
    jsonschema.validate(json.loads(out.text), schema)
    assert eng.stats()["kv_pages_used"] == 0


def test_an_engine_for_another_gpu_is_refused_unless_allowed(tiny_engine):
    from qwentrt.errors import ConfigError
    # tiny_engine was built for sm_89 (the RTX 4090); this test runs on another card.
    if torch.cuda.get_device_capability() == (8, 9):
        pytest.skip("this GPU is the engine's target")
    with pytest.raises(ConfigError, match="built for NVIDIA GeForce RTX 4090 .* --allow-gpu-mismatch"):
        LLMEngine(tiny_engine, device="cuda")
    LLMEngine(tiny_engine, device="cuda", num_blocks=16, allow_gpu_mismatch=True)


def _decoding_engine(engine_dir, prompt_lens) -> LLMEngine:
    """A CUDA engine with graphs, one greedy request per prompt length, stepped past their prefills.
    Synchronous steps: a batch scheduled next holds no token in flight (placeholder), so the test can run it
    through runner.run by itself."""
    eng = LLMEngine(engine_dir, device="cuda", num_blocks=256, max_batch_size=16, async_scheduling=False)
    assert eng.runner.graphs is not None
    for i, n in enumerate(prompt_lens):
        eng.add_request(f"r{i}", prompt_ids=torch.randint(0, 151000, (n,)).tolist(),
                        params=SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        eng.step()
    return eng


def test_cuda_graph_decode_matches_eager_decode(cuda_engine):
    """One decode step of a mixed-length batch: the captured graph (padded to its batch size, full-width
    block table) against the eager forward on the same cache state."""
    eng = _decoding_engine(cuda_engine, (5, 40, 77))
    batch = eng.scheduler.schedule()
    assert all(item.num_tokens == 1 for item in batch)
    graphed, seqs = eng.runner.run(batch, eng.block_manager)
    graphed = graphed.clone()
    graphs, eng.runner.graphs = eng.runner.graphs, None
    eager, seqs_eager = eng.runner.run(batch, eng.block_manager)
    eng.runner.graphs = graphs
    assert [s.request_id for s in seqs] == [s.request_id for s in seqs_eager]
    assert rel(graphed.cpu(), eager.cpu()) < 2e-2


def test_fused_kernels_match_the_reference_composition(cuda_engine, monkeypatch):
    """The tiny engine (INT4 AWQ, FP8 KV) on CUDA: a graphed decode step (fused q/k norm + RoPE + KV write,
    one-launch split-KV attention: contexts of 1 to 3 partitions) and an eager mixed step (a prefill chunk
    beside the decodes), each against the same step run eagerly with the torch references for those ops
    (the composition they replace)."""
    from qwentrt.engine.kernels import ops, reference

    eng = _decoding_engine(cuda_engine, (5, 300, 700))

    def both(batch):
        fast, seqs = eng.runner.run(batch, eng.block_manager)
        fast = fast.clone()
        graphs, eng.runner.graphs = eng.runner.graphs, None
        with monkeypatch.context() as m:
            m.setattr(ops, "qk_norm_rope_write_kv", reference.qk_norm_rope_write_kv)
            m.setattr(ops, "paged_attention", reference.paged_attention)
            ref, seqs_ref = eng.runner.run(batch, eng.block_manager)
        eng.runner.graphs = graphs
        assert [s.request_id for s in seqs] == [s.request_id for s in seqs_ref]
        return fast.cpu(), ref.cpu()

    batch = eng.scheduler.schedule()
    assert all(item.num_tokens == 1 for item in batch)
    fast, ref = both(batch)
    assert rel(fast, ref) < 2e-2, rel(fast, ref)
    eng.add_request("r3", prompt_ids=torch.randint(0, 151000, (90,)).tolist(),
                    params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    batch = eng.scheduler.schedule()
    assert any(item.num_tokens > 1 for item in batch) and any(item.num_tokens == 1 for item in batch)
    fast, ref = both(batch)
    assert rel(fast, ref) < 2e-2, rel(fast, ref)


def test_async_scheduling_on_cuda_graphs_gives_the_synchronous_outputs(cuda_engine):
    """The decode graph resolves the tokens in flight on the device: same tokens as the synchronous engine
    (the same batches run in both: every request is admitted at once and ends by max_tokens)."""
    prompts = [torch.randint(0, 151000, (n,)).tolist() for n in (5, 40, 77, 120, 33, 64)]
    params = [SamplingParams(max_tokens=24 + i, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    outs = {}
    for mode in (False, True):
        eng = LLMEngine(cuda_engine, device="cuda", num_blocks=256, max_batch_size=16, async_scheduling=mode)
        assert eng.runner.graphs is not None
        outs[mode] = [(o.token_ids, o.text, o.finish_reason) for o in eng.generate(prompts, params)]
        assert eng.stats()["kv_pages_used"] == 0
    assert outs[True] == outs[False]


def test_captured_prefill_graphs_match_the_eager_prefill(cuda_engine):
    """A lone whole prompt replays a prefill graph (prefill_graphs.py): the first token's log-probability and the
    greedy tokens as the eager prefill's, for prompts inside a bucket, on its edge and past several pages."""
    from .test_engine import random_prompts
    from .test_prefill_graphs import GREEDY, _spy
    prompts = random_prompts([3, 32, 200, 700])
    eager = LLMEngine(cuda_engine, device="cuda", num_blocks=256, prefill_graphs=False)
    graphs = LLMEngine(cuda_engine, device="cuda", num_blocks=256)
    assert eager.runner.prefill_graphs is None and graphs.runner.prefill_graphs.graphs
    used = _spy(graphs.runner)
    for p in prompts:
        a = eager.generate([p], GREEDY)[0]
        b = graphs.generate([p], GREEDY)[0]
        assert abs(a.logprobs[0] - b.logprobs[0]) < 5e-2, (len(p), a.logprobs[0], b.logprobs[0])
        assert b.token_ids[:2] == a.token_ids[:2], len(p)
    assert used == [len(p) for p in prompts]


def test_programmatic_dependent_launch_changes_no_result(cuda_engine, monkeypatch):
    """PDL (kernels/pdl.py) only moves launches earlier; every kernel waits before reading: the same tokens and
    log-probabilities through the decode graphs and an eager mixed step (sm_90+ only), up to the order the split-K
    atomics add in, which no run fixes."""
    from qwentrt.engine.kernels import pdl
    if not pdl.TRITON_HAS_PDL or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("no programmatic dependent launch here")
    from .test_engine import random_prompts
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)
    prompts = random_prompts([5, 40, 300])
    results = {}
    for flag in ("0", "1", "late"):
        monkeypatch.setenv("QWENTRT_PDL", flag)
        eng = LLMEngine(cuda_engine, device="cuda", num_blocks=256)
        assert pdl.enabled(torch.device("cuda")) == (flag != "0")
        assert pdl.late_trigger() == (flag == "late")
        results[flag] = [(o.token_ids, o.logprobs) for o in eng.generate(prompts, params)]
        results[flag] += [(o.token_ids, o.logprobs) for o in eng.generate(prompts[:1], params)]
        del eng
    for on in ("1", "late"):
        for (tokens_on, lp_on), (tokens_off, lp_off) in zip(results[on], results["0"]):
            assert tokens_on[:4] == tokens_off[:4]
            assert max(abs(a - b) for a, b in zip(lp_on[:4], lp_off[:4])) < 5e-2


@pytest.mark.parametrize("layout", ["lanes", "window"])
def test_deferred_split_k_changes_no_result(cuda_engine, tmp_path, layout, monkeypatch):
    """w4a16_gemv_deferred (w4a16_gemv.SplitKSums): the o / gate_up / down GEMVs leave float32 sums for the norm and
    the SiLU-mul to finish; the same tokens and log-probabilities as the GEMV's own split-K, through the decode
    graphs and eager steps, and the workspace zero after."""
    import shutil

    from qwentrt.engine.kernels.w4a16_gemv import split_k_workspace
    from .test_engine import random_prompts
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)
    prompts = random_prompts([1, 2, 40])
    monkeypatch.setenv("QWENTRT_GEMV_DEFERRED_QKV", "1")  # (the qkv GEMV's sums too)
    results = {}
    for deferred in (False, True):
        d = tmp_path / f"e{int(deferred)}"
        shutil.copytree(cuda_engine, d)
        cfg = json.loads((d / "engine.json").read_text())
        cfg["kernels"].update({"w4a16_gemv_max_tokens": 2, "w4a16_gemv_deferred": deferred,
                               "w4a16_gemv": {"default": {"BLOCK_N": 128 if layout == "lanes" else 256, "BLOCK_K": 8,
                                                          "SPLIT_K": 4, "num_warps": 1, "num_stages": 2,
                                                          "LAYOUT": layout}}})
        (d / "engine.json").write_text(json.dumps(cfg))
        eng = LLMEngine(d, device="cuda", num_blocks=256)
        results[deferred] = [(o.token_ids, o.logprobs) for o in eng.generate(prompts, params)]
        torch.cuda.synchronize()
        ws, counts = split_k_workspace(torch.device("cuda"))
        assert not ws.any() and not counts.any()
        del eng
    for (tokens_on, lp_on), (tokens_off, lp_off) in zip(results[True], results[False]):
        assert tokens_on[:4] == tokens_off[:4]
        assert max(abs(a - b) for a, b in zip(lp_on[:4], lp_off[:4])) < 5e-2


def test_tile_major_gemv_weights_change_no_result(cuda_engine, tmp_path, monkeypatch):
    """QWENTRT_GEMV_TILE_MAJOR=1 (experimental): each INT4 weight the GEMV runs is kept tile-major, its only copy
    (ops.pack_weight), and the GEMV, the GEMM and the dequantization all read it; the same tokens and
    log-probabilities through the decode graphs and eager steps."""
    from .test_engine import random_prompts
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)
    prompts = random_prompts([1, 2, 40])
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("QWENTRT_GEMV_TILE_MAJOR", flag)
        eng = LLMEngine(cuda_engine, device="cuda", num_blocks=256)
        for layer in eng.runner.model.layers:
            for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                assert lin.qweight.dim() == (3 if flag == "1" else 2)
                assert [name for name, _ in lin.named_buffers()] == ["qweight", "qzeros", "scales"]  # one copy
        results[flag] = [(o.token_ids, o.logprobs) for o in eng.generate(prompts, params)]
        del eng
    for (tokens_on, lp_on), (tokens_off, lp_off) in zip(results["1"], results["0"]):
        assert tokens_on[:4] == tokens_off[:4]
        assert max(abs(a - b) for a, b in zip(lp_on[:4], lp_off[:4])) < 5e-2
