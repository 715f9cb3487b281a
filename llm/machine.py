"""What a command needs to know about this machine without importing torch (the data and tokenizer CLIs
start in a fraction of a second without it): the CPU cores it may use and the names --device takes.
`llm.hardware` builds on these with torch (device resolution, peak FLOP/s, threads)."""

from __future__ import annotations

import os

DEVICE_HELP = "auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask on Linux, e.g. under taskset or a container's
    cpuset; all the machine's cores elsewhere): the default for worker pools and CPU threads."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity outside Linux
        return max(1, os.cpu_count() or 1)
