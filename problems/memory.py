"""Peak memory of a call, measured the same way for every method in a benchmark.

CPU: the process's resident-set high-water mark (VmHWM), reset just before the call through
/proc/self/clear_refs, minus the resident set at that moment: the peak extra memory the
call (forward + backward) needed. Run each measured configuration in a fresh process so
that memory freed by an earlier one does not hide this one's needs.
CUDA: torch.cuda.max_memory_allocated over the call, after reset_peak_memory_stats.
"""
import warnings
from pathlib import Path

import torch


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(fn, device="cpu"):
    """Run fn() and return (its result, peak extra memory in MiB)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:  # not Linux, or /proc read-only: no honest reading is possible
        warnings.warn("cannot reset the peak resident set (/proc/self/clear_refs); memory reported as NaN")
        return fn(), float("nan")
    base = _status_kb("VmRSS")
    out = fn()
    return out, (_status_kb("VmHWM") - base) / 1024
