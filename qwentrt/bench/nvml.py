"""GPU power, memory and utilization sampled by NVML (nvidia-ml-py) in a background thread, and the
energy a window of time used. Without a GPU or NVML every figure is None and `note` says why."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np


_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it; the project pins numpy<2


@dataclass
class Mark:
    """The start of a window: its time and the GPU's energy counter then (mJ; None without one)."""

    t: float
    energy_mj: int | None


@dataclass
class _Samples:
    t: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    mem_used: list[int] = field(default_factory=list)
    util: list[float] = field(default_factory=list)


def _device_index(device: str | None) -> int:
    """The NVML index of a torch device ("cuda", "cuda:1"), honoring CUDA_VISIBLE_DEVICES (integers)."""
    index = 0
    if device and ":" in device:
        index = int(device.split(":", 1)[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index < len(ids) and ids[index].isdigit():
            return int(ids[index])
    return index


class NvmlSampler:
    """`with NvmlSampler("cuda") as s:` samples every `interval_s`; `m = s.mark()` ... `s.summary(m)`."""

    def __init__(self, device: str | None = None, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.note: str | None = None
        self.gpu_name: str | None = None
        self.driver: str | None = None
        self.memory_total: int | None = None
        self._nvml = None
        self._handle = None
        self._has_energy = False
        self._samples = _Samples()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device is not None and not str(device).startswith("cuda"):
            self.note = f"device {device}: no GPU figures"
            return
        try:
            import pynvml
        except ImportError:
            self.note = "nvidia-ml-py (pynvml) is not installed: no power, energy or NVML memory figures"
            return
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.note = f"NVML unavailable ({e}): no power, energy or NVML memory figures"
            return
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_device_index(device))
            self._nvml = pynvml
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.gpu_name = name.decode() if isinstance(name, bytes) else name
            driver = pynvml.nvmlSystemGetDriverVersion()
            self.driver = driver.decode() if isinstance(driver, bytes) else driver
            self.memory_total = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        except Exception as e:
            self.note = f"NVML could not open the GPU ({e}): no power, energy or NVML memory figures"
            self._handle = self._nvml = None
            return
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self._has_energy = True
        except Exception:
            self.note = "this GPU has no energy counter: energy integrates the sampled power"

    @property
    def available(self) -> bool:
        return self._handle is not None

    # ---- the thread -------------------------------------------------------------------------------
    def start(self) -> "NvmlSampler":
        if self.available and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="qwentrt-nvml", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = self._handle = None

    def __enter__(self) -> "NvmlSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _sample(self) -> None:
        n, h = self._nvml, self._handle
        t = time.perf_counter()
        try:
            power = n.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception:
            power = float("nan")
        try:
            mem = int(n.nvmlDeviceGetMemoryInfo(h).used)
        except Exception:
            mem = -1
        try:
            util = float(n.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:
            util = float("nan")
        with self._lock:
            s = self._samples
            s.t.append(t)
            s.power_w.append(power)
            s.mem_used.append(mem)
            s.util.append(util)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    # ---- windows ----------------------------------------------------------------------------------
    def _energy_mj(self) -> int | None:
        if not self._has_energy:
            return None
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None

    def mark(self) -> Mark:
        if self.available:
            self._sample()
        return Mark(time.perf_counter(), self._energy_mj() if self.available else None)

    def summary(self, mark: Mark, end: float | None = None) -> dict:
        """Figures over [mark, end or now]: average power (W), energy (J; the GPU's counter, else the
        sampled power integrated), peak and average memory used (bytes, the whole GPU as NVML sees it),
        average utilization (%), and the number of samples."""
        empty = {"power_avg_w": None, "energy_j": None, "energy_source": None, "mem_used_peak_bytes": None,
                 "util_avg_pct": None, "samples": 0, "note": self.note}
        if not self.available:
            return empty
        self._sample()
        energy_end = self._energy_mj()
        end = end if end is not None else time.perf_counter()
        with self._lock:
            s = self._samples
            idx = [i for i, t in enumerate(s.t) if mark.t - self.interval_s <= t <= end + self.interval_s]
            t = np.array([s.t[i] for i in idx])
            p = np.array([s.power_w[i] for i in idx])
            mem = [s.mem_used[i] for i in idx if s.mem_used[i] >= 0]
            util = np.array([s.util[i] for i in idx])
        out = dict(empty, samples=len(idx))
        good = np.isfinite(p)
        if good.any():
            out["power_avg_w"] = float(p[good].mean())
        if mark.energy_mj is not None and energy_end is not None:
            out["energy_j"], out["energy_source"] = (energy_end - mark.energy_mj) / 1000.0, "nvml-counter"
        elif good.sum() >= 2:
            out["energy_j"], out["energy_source"] = float(_trapezoid(p[good], t[good])), "power-integral"
        if mem:
            out["mem_used_peak_bytes"] = int(max(mem))
        if np.isfinite(util).any():
            out["util_avg_pct"] = float(np.nanmean(util))
        return out
