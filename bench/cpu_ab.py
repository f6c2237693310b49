"""CPU per request of the edge, an older edge and nginx, side by side, on a
stack held by `MERIDIAN_BEFORE=<old build> python3 bench/hold.py edge`.

    python3 bench/cpu_ab.py /hello 16 4 2   # path, connections, seconds, rounds
    TLS=1 python3 bench/cpu_ab.py /index.html 1 4 4   # the HTTPS listeners

Each round runs wrk against each proxy in turn (reversed every other round)
and reads the proxy's user and system CPU from /proc before and after; the
totals are divided by the requests served. CPU per request is much steadier
than requests per second on a shared machine.
"""
import glob
import os
import re
import subprocess
import sys

work = max(glob.glob("/tmp/meridian-hold-*"), key=os.path.getmtime)


def port_of(path, pattern):
    return re.search(pattern, open(path).read(), re.M).group(1)


def pids(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cpu_ticks(ps):
    user = system = 0
    for p in ps:
        for t in os.listdir(f"/proc/{p}/task"):
            fields = open(f"/proc/{p}/task/{t}/stat").read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    return user, system


path, conns, secs = sys.argv[1], sys.argv[2], sys.argv[3]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
# TLS=1 measures the HTTPS listeners instead (SNI localhost, as bench.py does).
tls = os.environ.get("TLS") == "1"
edge_listen = r'^listen = "127.0.0.1:(\d+)"\ncerts_dir' if tls else r'^listen = "127.0.0.1:(\d+)"'
nginx_listen = r"listen 127.0.0.1:(\d+) ssl;" if tls else r"listen 127.0.0.1:(\d+);"
proxies = {
    "edge": (port_of(f"{work}/edge.toml", edge_listen), pids(f"edge --config {work}/edge.toml")),
    "nginx": (port_of(f"{work}/nginx/nginx.conf", nginx_listen), pids("nginx: worker")),
}
if os.path.exists(f"{work}/edge-before.toml"):
    proxies["before"] = (port_of(f"{work}/edge-before.toml", edge_listen),
                         pids(f"edge --config {work}/edge-before.toml"))
# The region behind them: what each proxy's requests cost it (the headers
# a proxy adds are parsed there too, on the same request's path).
region = pids(f"region --config {work}/")
tick = 1e6 / os.sysconf("SC_CLK_TCK")  # µs per tick
totals = {name: [0, 0, 0, 0.0, 0] for name in proxies}
for r in range(rounds):
    order = list(proxies) if r % 2 == 0 else list(reversed(proxies))
    for name in order:
        port, ps = proxies[name]
        before = cpu_ticks(ps)
        region_before = sum(cpu_ticks(region))
        out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{secs}s", f"https://localhost:{port}{path}" if tls else f"http://127.0.0.1:{port}{path}"],
                             capture_output=True, text=True).stdout
        after = cpu_ticks(ps)
        t_region = sum(cpu_ticks(region)) - region_before
        t = totals[name]
        t[0] += int(re.search(r"(\d+) requests in", out).group(1))
        t[1] += after[0] - before[0]
        t[2] += after[1] - before[1]
        t[3] += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        t[4] += t_region
for name, (n, user, system, rps, reg) in totals.items():
    print(f"{path}{' (TLS)' if tls else ''} c{conns} {name:7} {rps / rounds:8.0f} req/s  user {user * tick / n:5.1f} µs  "
          f"sys {system * tick / n:5.1f} µs  total {(user + system) * tick / n:5.1f}  region {reg * tick / n:5.1f} µs")
