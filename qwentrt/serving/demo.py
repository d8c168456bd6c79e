"""`make demo`: serve an engine on free loopback ports, stream one chat request over gRPC, stop.

    python -m qwentrt.serving.demo build/qwen3-tiny
"""

from __future__ import annotations

import json
import queue
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _input(name: str, arr: np.ndarray, dtype: str):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def main(engine_dir: str, prompt: str = "Write a haiku about a GPU.") -> int:
    import tritonclient.grpc as grpcclient

    from qwentrt.serving.repository import write_repository
    from qwentrt.serving.server import ServerOptions, TritonServer, free_ports

    work = Path(tempfile.mkdtemp(prefix="qwentrt-demo-"))
    repo = write_repository(engine_dir, work / "model_repository")
    server = TritonServer(ServerOptions(repo, *free_ports(3)), log_file=work / "triton.log")
    print(f"starting tritonserver on {server.grpc_url} (log: {work / 'triton.log'})", file=sys.stderr)
    with server:
        server.wait_ready(("qwen3",), 600)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        messages = json.dumps([{"role": "user", "content": prompt}]).encode()
        inputs = [_input("messages", np.array([[messages]], dtype=np.object_), "BYTES"),
                  _input("max_tokens", np.array([[48]], dtype=np.int32), "INT32"),
                  _input("stream", np.array([[True]]), "BOOL"),
                  _input("temperature", np.array([[0.7]], dtype=np.float32), "FP32"),
                  _input("seed", np.array([[0]], dtype=np.uint64), "UINT64")]
        start = time.perf_counter()
        client.async_stream_infer("qwen3", inputs, enable_empty_final_response=True)
        print(f"user: {prompt}\nqwen3: ", end="", flush=True)
        first, tokens = None, 0
        while True:
            result, error = results.get(timeout=600)
            if error is not None:
                print(f"\nerror: {error}", file=sys.stderr)
                return 1
            response = result.get_response()
            if response.outputs:
                first = first or time.perf_counter()
                print(result.as_numpy("text_output").reshape(-1)[0].decode(), end="", flush=True)
                tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
            if response.parameters["triton_final_response"].bool_param:
                break
        end = time.perf_counter()
        client.stop_stream()
        client.close()
        print(f"\n[{tokens} tokens, TTFT {1000 * (first - start):.0f} ms, {end - start:.2f} s in all; random "
              "weights speak gibberish]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
