"""Client side of qwentrt: gRPC clients for the "qwen3" model behind Triton, and load probes."""

from qwentrt.client.grpc_client import (
    AsyncClient,
    Client,
    Delta,
    Generation,
    GenerateParams,
    ServerError,
    Timings,
)
from qwentrt.client.probes import ProbeRecord, format_table, percentiles, run_probe, summarize

__all__ = ["AsyncClient", "Client", "Delta", "Generation", "GenerateParams", "ServerError", "Timings",
           "ProbeRecord", "format_table", "percentiles", "run_probe", "summarize"]
