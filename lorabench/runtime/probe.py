"""GPU measurement probes: an NVML sampler thread, ``torch.cuda`` allocator statistics, and MFU.

Three levels of a GPU memory number (docs/ARCHITECTURE.md):

- *allocated*: ``torch.cuda.max_memory_allocated`` (tensor bytes, rounded to 512-byte blocks);
- *reserved*: ``torch.cuda.max_memory_reserved`` (allocated + caching-allocator slack);
- *device*: what NVML sees: the device's used memory minus the baseline taken before the job touched CUDA
  (reserved + CUDA context + library workspaces such as cuBLAS's), sampled by :class:`NvmlSampler`.

:func:`resolve_device` and :func:`detect_gpu` ask NVML too (never torch), so the long-lived sweep parent
never creates a CUDA context of its own. pynvml (``nvidia-ml-py``) is imported lazily; without an NVIDIA driver the sampler reports ``available=False``
and every NVML field stays ``None``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from lorabench.errors import UserError
# Model FLOPs per token: one formula for plan's MFU and the runner's (re-exported for the runtime's callers).
from lorabench.steptime.flops import matmul_params, training_flops_per_token  # noqa: F401
from lorabench.specs import GpuSpec, ModelSpec

#: Query the per-process table (slow: it walks every process on the device) once per this many samples.
PROCESS_QUERY_EVERY = 10


@dataclass(frozen=True)
class NvmlReading:
    """What the sampler saw between :meth:`NvmlSampler.start` and :meth:`NvmlSampler.stop`.

    Attributes:
        available: False when NVML could not be initialised (no driver, no GPU).
        baseline_bytes: device used memory at ``start`` (before this process created its CUDA context).
        peak_used_bytes: max device used memory minus ``baseline_bytes`` (the job's device-level peak).
        process_peak_bytes: max ``usedGpuMemory`` NVML attributes to this PID (None when the driver does
            not report it, e.g. inside containers where NVML sees host PIDs).
        samples: number of device samples taken.
        achieved_hz: samples / sampling seconds.
        driver: the driver version string.
        error: why NVML is unavailable.
    """

    available: bool
    baseline_bytes: int | None = None
    peak_used_bytes: int | None = None
    process_peak_bytes: int | None = None
    samples: int = 0
    achieved_hz: float | None = None
    driver: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvml_handle(nvml: Any) -> Any:
    """The NVML handle of CUDA device 0 as this process sees it (honours ``CUDA_VISIBLE_DEVICES``)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(visible)
    return nvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)


class NvmlSampler:
    """Background thread sampling device used memory at ``hz`` (default 200 Hz) with pynvml.

    Start it before the job initialises CUDA so the baseline excludes this process's context; stop it after
    the last step. Sampling calls release the GIL (ctypes), but a busy Python main thread can delay the
    sampler by up to the interpreter's switch interval (5 ms), so ``achieved_hz`` is reported.
    """

    def __init__(self, hz: float = 200.0) -> None:
        if hz <= 0:
            raise ValueError(f"sampling rate {hz} Hz must be positive")
        self.period_s = 1.0 / hz
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._baseline = 0
        self._peak = 0
        self._process_peak: int | None = None
        self._samples = 0
        self._t0 = 0.0
        self._t1 = 0.0
        self._driver: str | None = None
        self._error: str | None = None

    def start(self) -> "NvmlSampler":
        """Initialise NVML, take the baseline and start sampling (a no-op when NVML is unavailable)."""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = _nvml_handle(pynvml)
            driver = pynvml.nvmlSystemGetDriverVersion()
            self._driver = driver.decode() if isinstance(driver, bytes) else str(driver)
            self._baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception as err:  # ImportError, NVMLError_*: no driver or no device
            self._error = f"{type(err).__name__}: {err}"
            self._nvml = None
            return self
        self._peak = self._baseline
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self, with_process: bool) -> None:
        used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        self._peak = max(self._peak, used)
        self._samples += 1
        if with_process:
            pid = os.getpid()
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                used_by_pid = getattr(proc, "usedGpuMemory", None)
                if proc.pid == pid and used_by_pid is not None:
                    self._process_peak = max(self._process_peak or 0, int(used_by_pid))

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self._sample(with_process=n % PROCESS_QUERY_EVERY == 0)
            except Exception as err:  # a transient NVML error must not kill the job
                self._error = f"{type(err).__name__}: {err}"
            n += 1
            self._stop.wait(self.period_s)

    def stop(self) -> NvmlReading:
        """Stop the thread, take a last sample, and return the reading."""
        if self._nvml is None:
            return NvmlReading(available=False, error=self._error)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._sample(with_process=True)
        except Exception as err:
            self._error = f"{type(err).__name__}: {err}"
        self._t1 = time.perf_counter()
        elapsed = max(self._t1 - self._t0, 1e-9)
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass
        return NvmlReading(available=True, baseline_bytes=self._baseline, peak_used_bytes=self._peak - self._baseline,
                           process_peak_bytes=self._process_peak, samples=self._samples,
                           achieved_hz=self._samples / elapsed, driver=self._driver, error=self._error)


# ---------------------------------------------------------------------------------------------- device
def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when NVML sees at least one GPU, else ``cpu`` (no torch import, no CUDA context)."""
    if requested in ("cpu", "cuda"):
        return requested
    if requested != "auto":
        raise UserError(f"device {requested!r} is unknown", "use device=auto, device=cpu or device=cuda")
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return "cuda" if count > 0 else "cpu"
    except Exception:  # no pynvml, no driver
        return "cpu"


def detect_gpu() -> GpuSpec | None:
    """The catalog GpuSpec of NVML device 0 (name equal to a catalog ``display``, else equal total memory),
    or None. Used when a CUDA run names no ``gpu``, so MFU and ``fits`` still have a reference."""
    try:
        import pynvml

        from lorabench.catalog import all_gpus

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    gpus = all_gpus()
    return (next((g for g in gpus if g.display == name), None)
            or next((g for g in gpus if g.memory_bytes == total), None))


#: ``torch.cuda.memory_stats()`` keys kept in a record (allocator behaviour worth reconciling).
CUDA_STAT_KEYS: tuple[str, ...] = (
    "allocated_bytes.all.peak",
    "reserved_bytes.all.peak",
    "active_bytes.all.peak",
    "inactive_split_bytes.all.peak",
    "requested_bytes.all.peak",
    "num_alloc_retries",
    "num_ooms",
    "num_device_alloc",
)


def cuda_memory_summary(torch: Any) -> dict[str, int | None]:
    """Peak allocated/reserved bytes and selected ``memory_stats()`` entries of the current device."""
    stats = torch.cuda.memory_stats()
    summary: dict[str, int | None] = {key: (int(stats[key]) if key in stats else None) for key in CUDA_STAT_KEYS}
    summary["max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    summary["max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return summary




def model_flops_utilization(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
    """MFU = achieved model FLOP/s / the device's dense peak (bf16 tensor-core peak from the GPU catalog)."""
    return flops_per_token * tokens_per_s / peak_flops_per_s
