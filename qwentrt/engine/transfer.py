"""Host <-> device copies that never make the host wait for the GPU.

`torch.tensor(values, device="cuda")` and `.tolist()` on a CUDA tensor both synchronize the stream: the
host waits for every kernel queued before them. With async scheduling the host queues step N+1 while
the GPU still runs step N, so the step's small host-made tensors go up through pinned memory with
non_blocking copies, and its sampled tokens come down into pinned buffers with an event the host waits
on only when it needs the values (HostCopy). On the CPU both are plain copies.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host values on `device`, without a stream sync (pinned staging, non_blocking copy;
    PyTorch's pinned-memory cache keeps the staging block until the copy has run)."""
    if isinstance(values, np.ndarray):  # torch cannot pin a tensor made from numpy: one copy into a pinned one
        host = torch.empty(values.shape, dtype=dtype, pin_memory=device.type != "cpu")
        host.copy_(torch.from_numpy(values))
        return host if device.type == "cpu" else host.to(device, non_blocking=True)
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class HostCopy:
    """Device tensors copied to pinned host memory behind the work queued so far; `wait()` blocks until
    that work and the copies are done and returns the host tensors. Each HostCopy owns its buffers, so
    two steps in flight never share one."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.event = None
        if not tensors or tensors[0].device.type == "cpu":
            self.host = list(tensors)
            return
        self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(self.host, tensors):
            h.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> list[torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.host
