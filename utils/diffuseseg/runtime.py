"""Where and how computation runs: device choice, CPU threads, the C library's memory reuse, mixed precision,
DDP ranks.

Mixed precision is device-aware on purpose: on CPUs without bf16 matrix units autocast is ~10x
slower than fp32, so ``auto`` means bf16 on CUDA only.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from diffuseseg.config import COMPILE_MODES, RunConfig
from diffuseseg.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is available (use run.device=auto or cpu)")
    return torch.device(name)


def configure_run(run: RunConfig) -> None:
    """A script's process settings from its ``run`` config section: ``run.threads`` and
    ``run.keep_freed_memory``."""
    configure_threads(run.threads)
    keep_freed_memory(run.keep_freed_memory)


# glibc's mallopt parameters (malloc.h) and its defaults for them
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def keep_freed_memory(keep: bool = True) -> bool:
    """Have the C library keep memory the process frees for its next allocations (``keep``), or hand it back
    to the system as it does by default. Why: glibc maps every block over its largest mmap threshold (32 MB)
    fresh from the system and unmaps it when freed, so each such tensor's pages are faulted in again as it is
    written. A batch of 16 faces at three timesteps makes 50 MB maps at 64 px, and the read-out of a batch of
    photos runs about 1.4x faster keeping freed memory (benchmark.py --parts photos). The cost: the process
    holds on to its peak memory. Returns whether it took effect (False where the C library is not glibc)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_max, trim = (0, 2 ** 31 - 1) if keep else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    return bool(mallopt(_M_MMAP_MAX, mmap_max)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))


def configure_threads(threads: int) -> None:
    """Set the process's torch CPU threads (0 = leave PyTorch's default). For scripts: a library function
    uses ``thread_scope`` so that it leaves the caller's thread count as it found it."""
    if threads > 0:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def thread_scope(threads: int) -> Iterator[None]:
    """``configure_threads`` for the duration of a block, restored after it. The thread count is process
    state that changes float results bit by bit (how reductions are split), so a library call must not
    leave it changed for whatever runs next in the process (a test, a notebook cell)."""
    before = torch.get_num_threads()
    configure_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype for ``train.mixed_precision`` on ``device`` (None = full fp32)."""
    if mixed_precision == "no":
        return None
    if mixed_precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        warnings.warn(f"mixed_precision={mixed_precision} on CPU is usually much slower than fp32", stacklevel=2)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def maybe_compile(module: Callable, mode: str, backend: str = "inductor") -> Callable:
    """``module`` (a module or function) itself (``mode="none"``) or ``torch.compile(module)`` in that mode. The
    compiled wrapper shares
    the module's parameters, so callers keep saving, clipping and averaging (EMA) the plain module: its weights
    and checkpoints are the same either way, and a run can resume with or without compiling.
    Modes only apply to the inductor backend; others (``aot_eager``: trace and run the graphs without
    generating kernels) ignore them."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {COMPILE_MODES}")
    if mode == "none":
        return module
    if backend != "inductor":
        return torch.compile(module, backend=backend)
    return torch.compile(module, mode=None if mode == "default" else mode, backend=backend)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Distributed(rank, world, local)


def rank_share(todo: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous block of ``todo`` (sizes differ by at most one)."""
    lo, hi = len(todo) * rank // world, len(todo) * (rank + 1) // world
    return todo[lo:hi]


def batched(items: Sequence[int], batch_size: int) -> list[list[int]]:
    """``items`` in consecutive batches of ``batch_size`` (the last may be shorter).

    Sharded work hands out whole batches of this grid (``rank_share(batched(...))``): a result depends, in
    its last float digits, on the batch it was computed in, so every rank must keep one process's batches
    for the output to stay byte-identical."""
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def barrier(dist_info: Distributed) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist_info.world_size > 1:
        dist.barrier()


def device_for(dist_info: Distributed, name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and dist_info.world_size > 1:
        return torch.device("cuda", dist_info.local_rank)
    return device


def peak_rss_mb(reset: bool = False) -> float | None:
    """This process's peak resident memory in MB (Linux's VmHWM) since it started or since the last
    ``reset=True`` call (which starts a new peak and returns the old one); None where /proc is not Linux's."""
    try:
        with open("/proc/self/status") as status:
            peak = next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), None)
        if reset:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets the peak to the current RSS
        return peak
    except OSError:
        return None


def private_rss_mb() -> float | None:
    """This process's resident anonymous memory in MB (Linux's RssAnon): what it holds itself, without the
    pages of memory-mapped files, which the kernel drops when memory runs short. None off Linux."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:")), None)
    except OSError:
        return None


class PrivateMemoryPeak:
    """The peak of ``private_rss_mb`` while the ``with`` block runs, sampled every ``interval`` seconds in a
    thread (Linux keeps no such peak; VmHWM counts memory-mapped features the process read, which are cache,
    not a need). ``peak_mb`` is None off Linux."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_mb = interval, private_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        now = private_rss_mb()
        if now is not None:
            self.peak_mb = max(self.peak_mb or 0.0, now)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "PrivateMemoryPeak":
        if self.peak_mb is not None:
            self._thread.start()
        return self

    def stop(self) -> float | None:
        """Stop watching; the peak."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
        return self.peak_mb

    def __enter__(self) -> "PrivateMemoryPeak":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
