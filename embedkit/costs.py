"""What a step cost: wall time per stage, peak memory, sizes. Measured where the work happens."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (the OS keeps the high-water mark).

    Linux: VmHWM, which starts afresh with each program. ru_maxrss survives exec, so a process
    started by a large one (a subprocess of a notebook, a benchmark's worker) would report the
    size of its parent instead of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # POSIX only
    except ImportError:  # Windows: the peak working set
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float:
    """Resident memory of this process now."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> bool:
    """Start the peak-memory mark afresh (Linux: writing 5 to clear_refs resets VmHWM), so that the next
    peak_rss_mb() is the peak of what ran since; False where the OS does not allow it (the mark then
    keeps the process's earlier peak, an upper bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cuda_peak_mb() -> float | None:
    torch = sys.modules.get("torch")  # only if the command already imported it
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


@dataclass
class Costs:
    """Seconds per named stage (stages may overlap: decode runs beside the model), plus counters."""

    stages: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:  # decode threads report too
            self.stages[name] = self.stages.get(name, 0.0) + seconds

    def count(self, name: str, n: float = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def to_dict(self) -> dict:
        d = {"wall_seconds": round(time.perf_counter() - self.started, 4),
             "stage_seconds": {k: round(v, 4) for k, v in self.stages.items()},
             "peak_rss_mb": round(peak_rss_mb(), 1), **{k: v for k, v in self.counters.items()}}
        cuda = cuda_peak_mb()
        if cuda is not None:
            d["cuda_peak_mb"] = round(cuda, 1)
        return d


def dir_bytes(path) -> int:
    from pathlib import Path

    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
