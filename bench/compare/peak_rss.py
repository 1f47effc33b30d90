"""Peak resident memory of the running Python process, shared by the peer benchmarks."""

import resource


def rss_mb() -> float:
    """Peak resident set of this process image in MiB: VmHWM, which starts afresh at exec.
    (ru_maxrss does not: a process started by a larger one, such as `gpg-rl bench`, would
    report its parent's resident set at fork time when that is larger.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
