"""Host memory: giving what freed tensors leave in the C heap back to the OS.

torch's CPU tensors come from the C library's malloc. glibc keeps freed blocks in its heap (and
raises its mmap threshold as larger blocks are freed), so a process's resident memory follows
the high-water mark of its heap rather than the tensors it holds. Building a model, ZeRO-3's
backward and its gradient partition between steps all free much more than they keep: these
functions hand that memory back (`release_host_memory`, `release_pages`) or stop the heap
from keeping it (`set_mmap_threshold`). Each is a no-op off Linux, and the two that call glibc's
malloc (`release_host_memory`, `set_mmap_threshold`) are no-ops off glibc too.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch


def release_host_memory() -> None:
    """Give the host memory that freed tensors leave in the C heap back to the OS (glibc's
    malloc_trim; a no-op elsewhere). Building a model allocates and frees many transients
    (each rank's full initial value of one parameter at a time, DeepSpeed's partitioning
    copies): without this they stay resident, in every process, for the rest of the run."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def glibc() -> Any:
    """The C library as a ctypes handle if it is glibc, else None: malloc_trim and mallopt are
    glibc's (another libc may lack them, or number mallopt's parameters differently). Looked up
    once: malloc_trim is called during backward (ZeRO-3's heap trim)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        getattr(libc, "gnu_get_libc_version")  # noqa: B009 - raises AttributeError off glibc
    except (OSError, AttributeError):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


M_MMAP_THRESHOLD = -3  # mallopt's parameter number for the mmap threshold (glibc's malloc.h)


def set_mmap_threshold(kib: int) -> bool:
    """From now on, give every host allocation of `kib` KiB or more a mapping of its own, which
    goes back to the OS when it is freed (glibc's `mallopt(M_MMAP_THRESHOLD)`).

    Why: glibc's own threshold starts at 128 KiB and slides up to the largest block freed so
    far (up to 32 MiB), so after the first step activations, gradients and optimizer
    temporaries come from the heap, and a heap keeps what is freed resident. A rank's RSS then
    holds the high-water mark of its heap's fragmentation, which differs between strategies
    and from run to run (for a 153M GPT on 2 CPU ranks, 13-57% over its live tensors:
    BENCHMARKS.md), instead of what it holds. The cost: every such block is mapped, faulted in
    page by page and unmapped again each time, which slowed CPU training by 20-30% at 1.5M-11M
    parameters (BENCHMARKS.md); hence off by default. Returns whether it took: False for
    `kib` <= 0, off glibc, and when the environment sets MALLOC_MMAP_THRESHOLD_ (that wins)."""
    libc = glibc()
    if kib <= 0 or libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, kib * 1024))


def release_pages(t: torch.Tensor) -> int:
    """Give the whole memory pages of CPU tensor `t` back to the OS, keeping its address:
    madvise(MADV_DONTNEED), after which they read as zeros and become resident again only when
    written (the partial pages at both ends keep their values). For a buffer that is written
    before it is read in every use (as ZeRO-3's gradient partition is in each backward), its
    memory is then resident only while it is in use. Autograd is not told (no version bump):
    only for buffers outside any graph, and only for anonymous memory: the pages of a
    file-backed tensor (`torch.load(..., mmap=True)`) would come back with the file's contents,
    not zeros, and are not detected here. Returns the bytes released: 0 for a tensor that is
    not in plain host memory (a GPU's; pinned, whose pages are locked; shared, whose pages
    other processes hold), that is not contiguous (its elements do not fill its byte range),
    and off Linux."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return 0
    if not t.is_contiguous() or t.is_shared():
        return 0
    try:
        if t.is_pinned():
            return 0
    except RuntimeError:  # no accelerator to have pinned it
        pass
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()  # contiguous: exactly its elements' bytes
    first = -(-start // page) * page  # whole pages only: the edges may hold other data
    last = end // page * page
    if last <= first:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(first, last - first, mmap.MADV_DONTNEED) != 0:
        return 0
    return last - first
