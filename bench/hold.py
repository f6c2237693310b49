"""Start a bench's stack and keep it up for measuring by hand.

    python3 bench/hold.py edge    # or: cache
    ...                           # measure (bench/cpu_ab.py, perf, strace)
    touch /tmp/hold-stop          # stops the stack and exits

Everything `bench.py <name>` would start is started the same way (the same
configs and environment knobs: EDGE_WORKERS, MERIDIAN_BEFORE), but instead
of running wrk the stack waits. The work directory is printed and starts
with /tmp/meridian-hold-.
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

STOP = "/tmp/hold-stop"


def hold(url, *args, **kwargs):
    print("holding; first url", url, f"(touch {STOP} to stop)", flush=True)
    while not os.path.exists(STOP):
        time.sleep(1)
    os.remove(STOP)
    bench.stop_all()
    os._exit(0)


bench.wrk = hold
work = tempfile.mkdtemp(prefix="meridian-hold-")
print("work", work, flush=True)
try:
    getattr(bench, "bench_" + sys.argv[1])(work, 8)
finally:
    bench.stop_all()
