"""Hand memory that the program has freed back to the operating system.

glibc's allocator keeps freed blocks in its heaps for reuse. A checkup frees activations of
many sizes, probe after probe, and the holes left between live blocks stay resident: on a 1 B
model about 0.35 GB after the knowledge probes' reference pass. `malloc_trim` releases them
(also from the middle of a heap); a long run calls it between stages and probes, where it
costs a few milliseconds. Elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def release_freed_memory() -> None:
    """Return freed heap memory to the operating system, where the platform can."""
    trim = _trim()
    if trim is not None:
        trim(0)
