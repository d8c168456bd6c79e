"""On the GPU machine: time the Triton kernels against their torch references (and cuBLAS bf16) at
Qwen3-4B's shapes; prints a table and writes $OUT/kernels.json. Medians of triton.testing.do_bench."""

import json
import os
import sys

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from tests.test_w4a16_kernel import bench_linears  # noqa: E402

out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
rows = bench_linears(tokens=(1, 4, 8, 16, 32, 64, 128))
out["linears"] = rows
print(f"{'tokens':>6} {'W4A16 triton ms':>16} {'torch ref ms':>13} {'cuBLAS bf16 ms':>15}   (36 layers' linears)")
for r in rows:
    print(f"{r['tokens']:>6} {r['triton_ms_36_layers']:>16.3f} {r['reference_ms_36_layers']:>13.3f} "
          f"{r['cublas_bf16_ms_36_layers']:>15.3f}")
try:
    from tests.test_paged_attention_kernel import bench_decode
except ImportError as e:
    print("no paged-attention bench:", e)
else:
    att = []
    for batch in (1, 16, 64, 256):
        for ctx in (1024, 4096):
            r = bench_decode(batch, ctx)
            att.append(dict(r, batch=batch, context=ctx) if isinstance(r, dict) else {"batch": batch, "context": ctx,
                                                                                      "result": r})
            print("paged attention decode", att[-1])
    out["paged_attention_decode"] = att
with open(os.path.join(os.environ.get("OUT", "/tmp"), "kernels.json"), "w") as f:
    json.dump(out, f, indent=1)
