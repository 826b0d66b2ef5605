"""Process tuning: how the scripts' processes use the machine, in one place a reader of the method can skip.

Nothing here changes a number the scripts compute; each setting changes only where memory lives or when
Python's collector runs. What each one buys is measured in bench/RESULTS.md; sspo.py records what it applied
in run_config.json (`reused_freed_memory`, `cuda_alloc_conf`).

- `gc_paused` and `freeze_collector`: Python's cyclic garbage collector kept off the millions of long-lived
  objects that importing torch / transformers and loading a model make (common.py's loaders and `cli`).
- `reuse_freed_memory`: on a CPU with glibc, malloc reuses freed memory for large tensors (sspo.py).
- `grow_cuda_segments`: on a GPU, PyTorch's caching allocator grows its segments in place (sspo.py).
"""
import contextlib
import gc
import os


@contextlib.contextmanager
def gc_paused():
    """The cyclic collector off while a library or model loads, and what was built then moved to its permanent
    generation (gc.freeze), where no later collection walks it: loading makes millions of objects that live
    as long as the process and hardly any garbage, and the collector would walk them again and again as they
    appear. Nested use and a collector already off are left as they are."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def freeze_collector():
    """Before the interpreter exits: what is left goes to the permanent generation, so the last collection
    does not walk every object torch and transformers made."""
    gc.freeze()


MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")
MALLOC_SETTINGS = {"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": 2 ** 31 - 1}  # reuse_freed_memory's, as the environment's names


def reuse_freed_memory():
    """Training on a CPU: make glibc's malloc reuse freed memory for large tensors instead of mapping fresh
    pages for each (mmap), which the kernel then faults in and zero-fills page by page at every step. The
    same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment: no mmap, and the freed
    top of the heap kept, so freed memory stays with the process (bench/RESULTS.md, "What each training lever
    gave"). A user's own MALLOC_* settings or an LD_PRELOAD'ed allocator are left alone; other C libraries
    (macOS, musl) are left as they are. Returns whether it was applied."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    option = {"MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1}  # M_MMAP_MAX, M_TRIM_THRESHOLD in glibc's malloc.h
    return all([bool(libc.mallopt(option[name], value)) for name, value in MALLOC_SETTINGS.items()])


CUDA_ALLOC_CONF = "expandable_segments:True"


def grow_cuda_segments():
    """Training on a GPU: PyTorch's caching allocator grows its memory segments in place (expandable_segments)
    instead of reserving a fixed block per request size. Batches whose shapes change at every step fragment
    fixed blocks: reserved memory grows far past what is allocated (bench/RESULTS.md, "GPU"), and each new
    block is a cudaMalloc that waits for the device. Set through the environment before CUDA starts; a
    user's own PYTORCH_CUDA_ALLOC_CONF wins. Returns the setting applied, or None."""
    import torch

    if any(os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")) or not torch.cuda.is_available() \
            or torch.cuda.is_initialized():
        return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF
    return CUDA_ALLOC_CONF
