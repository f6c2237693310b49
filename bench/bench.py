#!/usr/bin/env python3
"""Meridian benchmark harness: runs Meridian side by side with the peer a user
would otherwise pick, in one run, on this machine, and prints ratios.

    python3 bench/bench.py [all|host|cost|pooling|idle|edge|failover|deploy|replication|kvget|strong|density|rollout|large|control] [--duration S]

Needs: a release build (`cargo build --release`), wrk and nginx (apt),
`wasmtime` 48 (`cargo install wasmtime-cli --version 48.0.8 --locked`), and
for `large` componentize-py (`pip install componentize-py==0.17.2`).
Every process it starts listens on 127.0.0.1 and is killed by PID at exit.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERIDIAN = os.path.join(ROOT, "target", "release", "meridian")
HELLO = os.path.join(ROOT, "guests", "hello.wasm")
PROCS = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pinned():
    """BENCH_PIN=1: every server the benches start runs on CPU 0 and wrk on
    CPU 1 (taskset), so the load generator never takes a server's core, as
    a separate load machine would not. Servers then share one core: the
    edge and nginx run one worker each unless EDGE_WORKERS says otherwise."""
    return os.environ.get("BENCH_PIN") == "1"


SERVERS_CPU = ["taskset", "-c", "0"] if pinned() else []
LOAD_CPU = ["taskset", "-c", "1"] if pinned() else []


def start(cmd, log, **kw):
    # taskset execs the command: the pid stays the server's.
    p = subprocess.Popen([*SERVERS_CPU, *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT, **kw)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in PROCS:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_http(port, path="/", timeout=60, ok=lambda s: True):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            if ok(r.status):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}{path}")


def wrk(url, duration, conns=16, threads=1, extra=()):
    out = subprocess.run(
        [*LOAD_CPU, "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", *extra, url],
        capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        return v * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return {"rps": rps, "requests": requests, "p50_ms": pct(50), "p99_ms": pct(99),
            "errors": int(errors.group(1)) if errors else 0, "socket_errors": sock.group(1) if sock else ""}


def edge_workers():
    """EDGE_WORKERS=n: how many workers the edge and nginx both run with
    (threads serving the edge's user ports; nginx worker processes), or
    None for each one's default."""
    if os.environ.get("EDGE_WORKERS"):
        return int(os.environ["EDGE_WORKERS"])
    return 1 if pinned() else None


def edge_workers_line():
    """An edge config's `workers` line for `edge_workers()`; empty when that
    is None, so the edge's default holds."""
    n = edge_workers()
    return f"workers = {n}\n" if n else ""


def workers_note():
    """How many workers the edge and nginx ran with, for a section header."""
    n = edge_workers()
    pin = "; servers pinned to CPU 0, wrk to CPU 1" if pinned() else ""
    if n:
        return f"edge workers = {n}, nginx worker_processes {n}{pin}"
    return f"edge workers = one per core, nginx worker_processes auto ({os.cpu_count()} here)"


def tls_section(certs, name):
    return f'[tls]\nca = "{certs}/ca.pem"\ncert = "{certs}/{name}.pem"\nkey = "{certs}/{name}.key"\n'


def make_certs(work, *nodes):
    """`meridian certs`: a CA and one certificate per (role, name[, jurisdiction])."""
    certs = os.path.join(work, "certs")
    subprocess.run([MERIDIAN, "certs", "init", "--dir", certs], check=True, capture_output=True)
    for node in nodes:
        role, name = node[0], node[1]
        extra = ["--jurisdiction", node[2]] if len(node) > 2 else []
        subprocess.run([MERIDIAN, "certs", "issue", "--dir", certs, "--role", role, "--name", name, *extra],
                       check=True, capture_output=True)
    return certs


def wait_port(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Stack:
    """A standalone control plane + one region (the multi-machine roles)."""

    def __init__(self, work, app_dir, region_extra=""):
        self.work = work
        self.certs = make_certs(work, ("region", "bench", "eu"), ("edge", "edge-bench"), ("control", "control"),
                                ("operator", "operator"))
        self.token_file = os.path.join(work, "token")
        with open(self.token_file, "w") as f:
            f.write("bench-token")
        self.region_port, self.cluster_port, self.control_port = free_port(), free_port(), free_port()
        region_cfg = os.path.join(work, "region.toml")
        with open(region_cfg, "w") as f:
            f.write(f'name = "bench"\npublic_listen = "127.0.0.1:{self.region_port}"\n'
                    f'cluster_listen = "127.0.0.1:{self.cluster_port}"\n'
                    f'data_dir = "{work}/region-data"\ncluster_key_file = "{self.certs}/cluster.key"\n'
                    + region_extra + tls_section(self.certs, "bench"))
        control_cfg = os.path.join(work, "control.toml")
        with open(control_cfg, "w") as f:
            f.write(f'listen = "127.0.0.1:{self.control_port}"\ndata_dir = "{work}/control-data"\n'
                    f'token_file = "{self.token_file}"\n'
                    f'[[regions]]\nname = "bench"\nurl = "https://127.0.0.1:{self.cluster_port}"\n'
                    + tls_section(self.certs, "control"))
        self.region = start([MERIDIAN, "region", "--config", region_cfg], os.path.join(work, "region.log"))
        start([MERIDIAN, "control", "--config", control_cfg], os.path.join(work, "control.log"))
        wait_port(self.region_port)
        wait_port(self.control_port)
        self.cli("apps", "create", "bench", "--default")
        self.deploy(app_dir)

    def cli(self, *args):
        subprocess.run([MERIDIAN, *args, "--control", f"https://127.0.0.1:{self.control_port}",
                        "--token-file", self.token_file, "--tls-dir", self.certs], check=True, capture_output=True)

    def deploy(self, app_dir):
        self.cli("deploy", app_dir)


def start_nginx(work, name, http_block, user_root=False):
    """nginx in the foreground with its own prefix dir `work/name`, serving
    `http_block` (the inside of `http { }`). Returns (dir, process)."""
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(("user root;\n" if user_root else "")
                + f"worker_processes {edge_workers() or 'auto'};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n"
                + "events { worker_connections 4096; }\nhttp {\n  access_log off;\n" + http_block + "}\n")
    return d, start(["nginx", "-c", conf, "-p", d], os.path.join(work, f"{name}.log"))


def make_app(work, name="app", extra_static="", cache_control=None):
    d = os.path.join(work, name)
    os.makedirs(os.path.join(d, "static"), exist_ok=True)
    shutil.copy(HELLO, os.path.join(d, "hello.wasm"))
    with open(os.path.join(d, "static", "index.html"), "w") as f:
        f.write("<h1>bench</h1>" + extra_static)
    with open(os.path.join(d, "meridian.toml"), "w") as f:
        f.write('[app]\nname = "bench"\n[components.hello]\nsource = "hello.wasm"\n'
                '[[routes]]\npath = "/hello"\ncomponent = "hello"\n'
                '[[routes]]\npath = "/"\nstatic = "static"\n'
                + (f'cache_control = "{cache_control}"\n' if cache_control else ''))
    return d


def ratio(a, b):
    return f"{a / b:.2f}x" if b else "n/a"


def bench_host(work, duration):
    """Region node vs `wasmtime serve`, same component, same load."""
    stack = Stack(work, make_app(work))
    wt_port = free_port()
    start(["wasmtime", "serve", "--addr", f"127.0.0.1:{wt_port}", HELLO], os.path.join(work, "wasmtime.log"))
    wait_http(wt_port, "/hello")
    rows = []
    for conns in (16, 64):
        # Alternate to spread machine noise over both.
        w1 = wrk(f"http://127.0.0.1:{wt_port}/hello", duration, conns)
        m1 = wrk(f"http://127.0.0.1:{stack.region_port}/hello", duration, conns)
        w2 = wrk(f"http://127.0.0.1:{wt_port}/hello", duration, conns)
        m2 = wrk(f"http://127.0.0.1:{stack.region_port}/hello", duration, conns)
        w = {k: (w1[k] + w2[k]) / 2 for k in ("rps", "p50_ms", "p99_ms")}
        m = {k: (m1[k] + m2[k]) / 2 for k in ("rps", "p50_ms", "p99_ms")}
        rows.append((conns, w, m, m1["errors"] + m2["errors"] + w1["errors"] + w2["errors"]))
    print(f"\n## Function host: region node vs `wasmtime serve` ({os.path.basename(HELLO)}, "
          f"{os.path.getsize(HELLO) // 1024} KiB C guest, wrk -t1, {duration}s x2 each)\n")
    print("| connections | wasmtime serve req/s | meridian req/s | throughput ratio | wasmtime p99 ms | meridian p99 ms | p99 ratio | non-2xx |")
    print("|---|---|---|---|---|---|---|---|")
    for conns, w, m, errs in rows:
        print(f"| {conns} | {w['rps']:.0f} | {m['rps']:.0f} | {ratio(m['rps'], w['rps'])} | "
              f"{w['p99_ms']:.2f} | {m['p99_ms']:.2f} | {ratio(m['p99_ms'], w['p99_ms'])} | {errs} |")


def bench_edge(work, duration):
    """Edge in front of a region vs nginx in front of the same region. Both
    reach the region the same way: mutual TLS to its cluster port, pooled
    keep-alive connections (nginx with proxy_ssl_certificate and session
    reuse). "direct" is the region's public port, plain HTTP."""
    stack = Stack(work, make_app(work))
    edge_port, edge_cluster, nginx_port = free_port(), free_port(), free_port()
    edge_tls_port, nginx_tls_port = free_port(), free_port()
    # One certificate for both HTTPS ports (ECDSA P-256, for localhost).
    sites = os.path.join(work, "sites")
    os.makedirs(sites)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", os.path.join(sites, "localhost.key"), "-out", os.path.join(sites, "localhost.pem"),
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    edge_cfg = os.path.join(work, "edge.toml")
    with open(edge_cfg, "w") as f:
        f.write(f'name = "edge-bench"\nlisten = "127.0.0.1:{edge_port}"\ncluster_listen = "127.0.0.1:{edge_cluster}"\n'
                f'location = {{ lat = 50.0, lon = 8.0 }}\n'
                # A reverse proxy against a reverse proxy: the edge's cache
                # is off here (`bench.py cache` measures caches).
                f'[cache]\nenabled = false\n'
                f'[https]\nlisten = "127.0.0.1:{edge_tls_port}"\ncerts_dir = "{sites}"\n'
                f'[[regions]]\nname = "bench"\nurl = "https://127.0.0.1:{stack.cluster_port}"\n'
                f'location = {{ lat = 50.0, lon = 8.0 }}\n' + tls_section(stack.certs, "edge-bench"))
    env = dict(os.environ)
    if os.environ.get("EDGE_THREADS"):
        env["MERIDIAN_WORKER_THREADS"] = os.environ["EDGE_THREADS"]
    workers = edge_workers_line()
    with open(edge_cfg, "r+") as f:
        text = f.read()
        f.seek(0)
        f.write(workers + text)
    edge_proc = start([MERIDIAN, "edge", "--config", edge_cfg], os.path.join(work, "edge.log"), env=env)
    wait_http(edge_port, "/", ok=lambda s: s == 200)
    # MERIDIAN_BEFORE=path: an older build's edge beside it, same config on
    # other ports (a `workers` line only if that build knows it).
    before_port = None
    if os.environ.get("MERIDIAN_BEFORE"):
        before_port, before_cluster, before_tls = free_port(), free_port(), free_port()
        before_cfg = os.path.join(work, "edge-before.toml")
        text = open(edge_cfg).read().replace(workers, "", 1) if workers else open(edge_cfg).read()
        text = (text.replace(f"127.0.0.1:{edge_port}", f"127.0.0.1:{before_port}")
                .replace(f"127.0.0.1:{edge_cluster}", f"127.0.0.1:{before_cluster}")
                .replace(f"127.0.0.1:{edge_tls_port}", f"127.0.0.1:{before_tls}"))
        with open(before_cfg, "w") as f:
            f.write(text)
        start([os.environ["MERIDIAN_BEFORE"], "edge", "--config", before_cfg], os.path.join(work, "edge-before.log"),
              env=env)
        wait_http(before_port, "/", ok=lambda s: s == 200)
    _, nginx_proc = start_nginx(work, "nginx", f"""
  upstream region {{ server 127.0.0.1:{stack.cluster_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{nginx_port};
    listen 127.0.0.1:{nginx_tls_port} ssl;
    ssl_certificate {sites}/localhost.pem;
    ssl_certificate_key {sites}/localhost.key;
    ssl_protocols TLSv1.3;
    # The suite rustls picks first, so both ends do the same work.
    ssl_conf_command Ciphersuites TLS_AES_256_GCM_SHA384;
    location / {{
      proxy_pass https://region;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # As the edge does: the region picks the app by Host (a bare address
      # is the default app).
      proxy_set_header Host 127.0.0.1:{stack.cluster_port};
      proxy_buffering on;
      proxy_ssl_certificate {stack.certs}/edge-bench.pem;
      proxy_ssl_certificate_key {stack.certs}/edge-bench.key;
      proxy_ssl_trusted_certificate {stack.certs}/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name bench.region.meridian;
      proxy_ssl_server_name on;
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_session_reuse on;
    }}
  }}
""")
    wait_http(nginx_port, "/", ok=lambda s: s == 200)
    print(f"\n## Edge router vs nginx reverse proxy (same region behind both, both over mutual TLS to its cluster port; "
          f"direct = its public port; wrk -t1, {duration}s each, two rounds alternated, mean; {workers_note()})\n")
    print("| path | connections | direct p50 ms | edge p50 ms | nginx p50 ms | edge added p50 µs | nginx added p50 µs "
          "| edge added p99 µs | nginx added p99 µs | direct req/s | edge req/s | nginx req/s | edge/nginx throughput "
          "| edge CPU µs/req | nginx CPU µs/req |" + (" before req/s | edge/before |" if before_port else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if before_port else ""))
    rows = [(path, conns, f"http://127.0.0.1:{edge_port}", f"http://127.0.0.1:{nginx_port}", path,
             f"http://127.0.0.1:{before_port}")
            for path in ("/index.html", "/hello") for conns in (1, 16)]
    # HTTPS to both (same certificate, TLS 1.3, AES-256-GCM; wrk keeps its
    # connections, so this is the record layer, not handshakes).
    rows += [(path, conns, f"https://localhost:{edge_tls_port}", f"https://localhost:{nginx_tls_port}", f"{path} (TLS)",
              f"https://localhost:{before_tls}" if before_port else None)
             for path in ("/index.html", "/hello") for conns in (1, 16)]
    for path, conns, edge_url, nginx_url, label, before_url in rows:
        # Two rounds, averaged, the proxies in the opposite order in the
        # second: one 8 s window on this shared machine swings ±20 %, and a
        # fixed order would favour whoever runs in the quieter slot.
        rounds = {"d": [], "e": [], "n": [], "b": []}
        for r in range(2):
            rounds["d"].append(wrk(f"http://127.0.0.1:{stack.region_port}{path}", duration, conns))
            proxies = [("e", lambda: wrk_cpu(f"{edge_url}{path}", duration, conns, edge_proc.pid)),
                       ("n", lambda: wrk_cpu(f"{nginx_url}{path}", duration, conns, nginx_proc.pid))]
            if before_port:
                proxies.append(("b", lambda: wrk(f"{before_url}{path}", duration, conns)))
            for name, run in proxies if r == 0 else reversed(proxies):
                rounds[name].append(run())
        d, e, n = mean_runs(rounds["d"]), mean_runs(rounds["e"]), mean_runs(rounds["n"])
        b = mean_runs(rounds["b"]) if before_port else None
        for name, r in (("edge", e), ("nginx", n)):
            if r["errors"] or r["socket_errors"]:
                print(f"<!-- {name} {label} c{conns}: {r['errors']} non-2xx, {r['socket_errors']} -->")
        print(f"| {label} | {conns} | {d['p50_ms']:.3f} | {e['p50_ms']:.3f} | {n['p50_ms']:.3f} | "
              f"{(e['p50_ms'] - d['p50_ms']) * 1000:.0f} | {(n['p50_ms'] - d['p50_ms']) * 1000:.0f} | "
              f"{(e['p99_ms'] - d['p99_ms']) * 1000:.0f} | {(n['p99_ms'] - d['p99_ms']) * 1000:.0f} | "
              f"{d['rps']:.0f} | {e['rps']:.0f} | {n['rps']:.0f} | {ratio(e['rps'], n['rps'])} | "
              f"{e['cpu_us']:.1f} | {n['cpu_us']:.1f} |"
              + (f" {b['rps']:.0f} | {ratio(e['rps'], b['rps'])} |" if b else ""))


def bench_cache(work, duration):
    """Cache hits: the edge vs Varnish vs nginx proxy_cache, the same objects
    (a small page, a 64 KiB asset and ~50 KiB of script asked for gzipped;
    `Cache-Control: public, max-age=300`) from the same region, all three
    warmed first. Varnish (open source) has
    no TLS to backends, so the caches fill from the region's public port;
    the edge fills over mutual TLS as always. Hits never reach the region."""
    d = make_app(work, cache_control="public, max-age=300")
    with open(os.path.join(d, "static", "asset.bin"), "wb") as f:
        f.write(os.urandom(64 << 10))
    # Text a CDN sends gzipped: ~50 KiB of script, asked for with
    # `Accept-Encoding: gzip`. Each server compresses it its usual way: the
    # edge and Varnish (`do_gzip`) once, when they store it; nginx on every
    # answer (`gzip on`; its proxy_cache keeps the body as it came).
    with open(os.path.join(d, "static", "app.js"), "w") as f:
        f.write("".join(f"export function f{i}(a, b) {{ return a * {i} + b - {i * 7 % 13}; }}\n"
                        for i in range(1000)))
    stack = Stack(work, d)
    edge_port, edge_cluster, varnish_port, nginx_port = free_port(), free_port(), free_port(), free_port()
    edge_cfg = os.path.join(work, "edge.toml")
    with open(edge_cfg, "w") as f:
        f.write(f'name = "edge-bench"\nlisten = "127.0.0.1:{edge_port}"\ncluster_listen = "127.0.0.1:{edge_cluster}"\n'
                + edge_workers_line()
                + f'location = {{ lat = 50.0, lon = 8.0 }}\n'
                f'[[regions]]\nname = "bench"\nurl = "https://127.0.0.1:{stack.cluster_port}"\n'
                f'location = {{ lat = 50.0, lon = 8.0 }}\n' + tls_section(stack.certs, "edge-bench"))
    start([MERIDIAN, "edge", "--config", edge_cfg], os.path.join(work, "edge.log"))
    vdir = os.path.join(work, "varnish")
    os.makedirs(vdir)
    vcl = os.path.join(vdir, "default.vcl")
    with open(vcl, "w") as f:
        f.write(f'vcl 4.1;\nbackend region {{ .host = "127.0.0.1"; .port = "{stack.region_port}"; }}\n'
                'sub vcl_backend_response {\n  if (bereq.url == "/app.js") { set beresp.do_gzip = true; }\n}\n')
    start(["varnishd", "-F", "-j", "none", "-f", vcl, "-a", f"127.0.0.1:{varnish_port}", "-n", vdir, "-s", "malloc,256m"],
          os.path.join(work, "varnish.log"))
    ndir = os.path.join(work, "nginx")
    os.makedirs(os.path.join(ndir, "cache"))
    start_nginx(work, "nginx", f"""
  proxy_cache_path {ndir}/cache keys_zone=bench:16m max_size=256m;
  upstream region {{ server 127.0.0.1:{stack.region_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{nginx_port};
    location / {{
      proxy_pass http://region;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:{stack.region_port};
      proxy_cache bench;
      proxy_cache_lock on;
      add_header X-Cache-Status $upstream_cache_status;
      gzip on;
      gzip_types application/javascript text/javascript;
      gzip_proxied any;
    }}
  }}
""", user_root=True)
    for port in (edge_port, varnish_port, nginx_port):
        wait_http(port, "/index.html", ok=lambda s: s == 200)
        for path in ("/index.html", "/asset.bin"):
            for _ in range(3):
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}").read()
        for _ in range(3):
            r = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/app.js",
                                                              headers={"Accept-Encoding": "gzip"}))
            body = r.read()
        if r.headers.get("Content-Encoding") != "gzip":
            print(f"<!-- port {port} did not answer /app.js gzipped -->")
        else:
            print(f"<!-- port {port}: /app.js {len(body)} bytes gzipped -->")
    print(f"\n## Cache hits: edge vs Varnish vs nginx proxy_cache (same objects, warmed; wrk -t1, {duration}s each, "
          f"two rounds alternated, mean; {workers_note()})\n")
    print("| object | connections | edge req/s | Varnish req/s | nginx req/s | edge p50 / p99 ms | Varnish p50 / p99 ms "
          "| nginx p50 / p99 ms | edge/Varnish | edge/nginx |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gzip = ("-H", "Accept-Encoding: gzip")
    for path, extra in (("/index.html", ()), ("/asset.bin", ()), ("/app.js", gzip)):
        for conns in (1, 16):
            # Two rounds, the second in reverse order, so no server always
            # runs in the same slot of a noisy machine; the mean is shown.
            ports = {"edge": edge_port, "varnish": varnish_port, "nginx": nginx_port}
            runs = {name: [] for name in ports}
            for order in (list(ports), list(reversed(ports))):
                for name in order:
                    runs[name].append(wrk(f"http://127.0.0.1:{ports[name]}{path}", duration, conns, extra=extra))
            e, v, n = (mean_runs(runs[name]) for name in ports)
            for name, r in (("edge", e), ("varnish", v), ("nginx", n)):
                if r["errors"] or r["socket_errors"]:
                    print(f"<!-- {name} {path} c{conns}: {r['errors']} errors, {r['socket_errors']} -->")
            label = f"{path} (gzip)" if extra else path
            print(f"| {label} | {conns} | {e['rps']:.0f} | {v['rps']:.0f} | {n['rps']:.0f} | "
                  f"{e['p50_ms']:.3f} / {e['p99_ms']:.3f} | {v['p50_ms']:.3f} / {v['p99_ms']:.3f} | "
                  f"{n['p50_ms']:.3f} / {n['p99_ms']:.3f} | {ratio(e['rps'], v['rps'])} | {ratio(e['rps'], n['rps'])} |")


def bench_plan():
    """Routing decision cost, in process (`examples/plan_cost.rs`)."""
    print("\n## Routing decision per request (in process; "
          "`cargo run --release -p meridian-edge --example plan_cost`)\n")
    out = subprocess.run(["cargo", "run", "-q", "--release", "-p", "meridian-edge", "--example", "plan_cost"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    print(out.strip())


class Load:
    """Closed-loop GET load from several threads, one keep-alive connection each."""

    def __init__(self, port, path, headers, threads=4):
        self.samples = []  # (start, end, ok, region)
        self.errors = []
        self.lock = threading.Lock()
        self.stop = False
        self.threads = [threading.Thread(target=self.run, args=(port, path, headers)) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, port, path, headers):
        c = None
        while not self.stop:
            t0 = time.monotonic()
            try:
                if c is None:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("GET", path, headers=headers)
                r = c.getresponse()
                body = r.read()
                ok, region = r.status == 200, r.getheader("x-meridian-region", "")
                if not ok:
                    self.errors.append(f"{r.status} {body[:200]!r}")
            except (OSError, http.client.HTTPException) as e:
                ok, region, c = False, "", None
                self.errors.append(repr(e))
            with self.lock:
                self.samples.append((t0, time.monotonic(), ok, region))

    def finish(self):
        self.stop = True
        for t in self.threads:
            t.join()
        return self.samples


def dev_world(work, extra=()):
    wdir = os.path.join(work, "world")
    start([MERIDIAN, "dev", "--world", wdir, "--port-base", "0", *extra], os.path.join(work, "dev.log"))
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            w = json.load(open(os.path.join(wdir, "world.json")))
            if w["ready"]:
                return wdir, w
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError("dev world did not start")


def bench_failover(work, runs=5):
    """SIGKILL of the nearest region -> first rerouted success, -> 100 % rerouted."""
    wdir, w = dev_world(work)
    edge = next(e for e in w["edges"] if e["name"] == "edge-eu-west")
    port = int(edge["url"].rsplit(":", 1)[1])
    firsts, fulls, failures, total = [], [], 0, 0
    for i in range(runs):
        load = Load(port, "/hello", {"x-meridian-client-geo": "48.86,2.35"})
        time.sleep(1.0)
        w = json.load(open(os.path.join(wdir, "world.json")))
        pid = next(p["pid"] for p in w["processes"] if p["name"] == "eu-west")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        time.sleep(2.0)
        samples = load.finish()
        after = [s for s in samples if s[1] > killed]
        rerouted = [s for s in after if s[2] and s[3] == "us-east"]
        first = min(s[1] for s in rerouted) - killed
        # 100 % rerouted: every request that started after this point went to us-east.
        last_bad = max([s[0] for s in after if s[3] != "us-east"] + [killed])
        full = next(s[0] for s in sorted(after) if s[0] > last_bad) - killed
        firsts.append(first * 1000)
        fulls.append(full * 1000)
        failures += sum(1 for s in samples if not s[2])
        total += len(samples)
        subprocess.run([MERIDIAN, "chaos", "restart", "eu-west", "--world", wdir], check=True, capture_output=True)
        # Wait until traffic is back on eu-west before the next run.
        deadline = time.time() + 30
        while time.time() < deadline:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/hello", headers={"x-meridian-client-geo": "48.86,2.35"})
            r = c.getresponse()
            r.read()
            if r.getheader("x-meridian-region") == "eu-west":
                break
            time.sleep(0.1)
    print(f"\n## Failover: SIGKILL of eu-west under load from a European client ({runs} runs, health interval 500 ms)\n")
    print("| metric | median ms | max ms | target |")
    print("|---|---|---|---|")
    print(f"| kill -> first success from us-east | {statistics.median(firsts):.1f} | {max(firsts):.1f} | < 1000 |")
    print(f"| kill -> 100 % of new requests on us-east | {statistics.median(fulls):.1f} | {max(fulls):.1f} | < 1000 |")
    print(f"\nFailed requests: {failures} of {total}. (Route 53 fast health checks: 30 s + DNS TTL.)")


def bench_deploy(work, runs=10):
    """First request after a deploy vs a warm request, straight to the region."""
    stack = Stack(work, make_app(work))
    def timed_get():
        c = http.client.HTTPConnection("127.0.0.1", stack.region_port, timeout=10)
        c.connect()
        t0 = time.perf_counter()
        c.request("GET", "/hello")
        r = c.getresponse()
        r.read()
        dt = (time.perf_counter() - t0) * 1000
        return dt, r.getheader("x-meridian-version")
    firsts, warms = [], []
    for i in range(runs):
        app = make_app(work, f"app{i}", extra_static=f"<!-- {i} -->")
        # A distinct component too (a custom section appended), so every
        # version compiles its own code at deploy time.
        with open(os.path.join(app, "hello.wasm"), "ab") as f:
            name, payload = b"bench", f"{time.time()}-{i}".encode()
            body = bytes([len(name)]) + name + payload
            f.write(b"\x00" + bytes([len(body)]) + body)
        stack.deploy(app)
        first, v = timed_get()
        firsts.append(first)
        warm = [timed_get()[0] for _ in range(50)]
        warms.append(statistics.median(warm))
    print(f"\n## First request after deploy vs warm request ({runs} deploys, direct to the region)\n")
    print("| first request p50 ms | first request max ms | warm request p50 ms | first - warm (p50) ms | target |")
    print("|---|---|---|---|---|")
    print(f"| {statistics.median(firsts):.2f} | {max(firsts):.2f} | {statistics.median(warms):.2f} | "
          f"{statistics.median(firsts) - statistics.median(warms):.2f} | < 5 ms slower |")


def bench_rollout(work, runs=10):
    """Deploy -> every region serving the new version (no bake), under load
    from every edge; and a gate breach -> the last region back on the old
    version."""
    wdir, w = dev_world(work)
    geos = {"edge-us-east": "40.71,-74.0", "edge-eu-west": "53.35,-6.26", "edge-ap-southeast": "1.29,103.85"}
    loads = [Load(int(e["url"].rsplit(":", 1)[1]), "/hello", {"x-meridian-client-geo": geos.get(e["name"], "0,0")}, 2)
             for e in w["edges"]]
    example = os.path.join(wdir, "example-app")
    regions = [(r["name"], int(r["url"].rsplit(":", 1)[1])) for r in w["regions"]]

    def version_at(port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/hello")
        r = c.getresponse()
        r.read()
        return r.getheader("x-meridian-version")

    def variant(i, extra_manifest="", trap=False):
        d = os.path.join(work, f"v{i}")
        shutil.copytree(example, d)
        with open(os.path.join(d, "static", "index.html"), "a") as f:
            f.write(f"<!-- {i} {time.time()} -->")
        text = open(os.path.join(d, "meridian.toml")).read()
        if trap:
            shutil.copy(os.path.join(ROOT, "guests", "hostile.wasm"), os.path.join(d, "components", "hostile.wasm"))
            text = text.replace("[[routes]]", '[components.hostile]\nsource = "components/hostile.wasm"\n\n'
                                '[[routes]]\npath = "/trap"\ncomponent = "hostile"\n\n[[routes]]', 1)
        with open(os.path.join(d, "meridian.toml"), "w") as f:
            f.write(text + extra_manifest)
        return d

    times = []
    for i in range(runs):
        d = variant(i)
        t0 = time.monotonic()
        out = subprocess.run([MERIDIAN, "deploy", d, "--world", wdir], capture_output=True, text=True, check=True)
        returned = time.monotonic() - t0
        new = re.search(r"deployed hello version (\w+)", out.stdout).group(1)
        for name, port in regions:
            while version_at(port) != new:
                time.sleep(0.005)
        times.append((returned, time.monotonic() - t0))
        time.sleep(0.5)
    for l in loads:
        l.finish()
    samples = sum((l.samples for l in loads), [])
    failed = sum(1 for s in samples if not s[2])

    # A version whose /trap route fails (500) on the canary under load.
    trap_load = Load(int(next(e["url"] for e in w["edges"] if e["name"] == "edge-us-east").rsplit(":", 1)[1]),
                     "/trap", {"x-meridian-client-geo": "40.71,-74.0"}, 2)
    d = variant(99, '\n[rollout]\nwaves = [["us-east"], ["eu-west", "ap-southeast"]]\nsteps = [25, 50, 100]\n'
                    'bake_ms = 1000\nmax_error_percent = 5\nmin_requests = 10\n', trap=True)
    out = subprocess.run([MERIDIAN, "deploy", d, "--world", wdir], capture_output=True, text=True)
    trap_load.finish()
    text = out.stdout + out.stderr
    breach = [int(m.group(1)) for m in re.finditer(r"FAIL \+(\d+) ms", text)]
    back = [int(m.group(1)) for m in re.finditer(r"rollback ok   \+(\d+) ms", text)]
    print(f"\n## Rollout of the example app to three regions (dev world, no bake time, {runs} deploys)\n")
    print("Default plan: us-east (canary) first, then eu-west and ap-southeast; every deploy changes a static file.")
    print("Load: 2 closed-loop clients per edge on /hello throughout.\n")
    print("| deploy | `meridian deploy` returned s | every region serving it s | target |")
    print("|---|---|---|---|")
    for i, (r, a) in enumerate(times):
        print(f"| {i + 1} | {r:.2f} | {a:.2f} | < 2 |")
    print(f"\nRequests during the deploys: {len(samples)}, failed: {failed}.")
    print("\n## Gate breach -> last region back on the old version\n")
    if out.returncode == 0 or not breach or not back:
        print(f"(the failing version was not rolled back as expected)\n```\n{text}\n```")
    else:
        print("| gate breach at (ms into the rollout) | last rollback done at | breach -> rolled back ms | target |")
        print("|---|---|---|---|")
        print(f"| {breach[0]} | {max(back)} | {max(back) - breach[0]} | < 1000 |")


def bench_control(work, runs=5):
    """SIGKILL of the control plane's leader -> the control plane takes a
    change again (an app created through any node), under the dev world's
    three control nodes."""
    wdir, w = dev_world(work)

    def leader():
        out = subprocess.run([MERIDIAN, "status", "--json", "--world", wdir], capture_output=True, text=True)
        try:
            return json.loads(out.stdout[out.stdout.index("{"):])["control"]["control"]["leader"]
        except (ValueError, KeyError, TypeError):
            return None

    times = []
    for i in range(runs):
        name = None
        while name is None:
            name = leader()
            time.sleep(0.1)
        subprocess.run([MERIDIAN, "chaos", "kill", name, "--world", wdir], check=True, capture_output=True)
        killed = time.monotonic()
        while subprocess.run([MERIDIAN, "apps", "create", f"after-{i}", "--world", wdir],
                             capture_output=True).returncode != 0:
            time.sleep(0.02)
        times.append(time.monotonic() - killed)
        subprocess.run([MERIDIAN, "chaos", "restart", name, "--world", wdir], check=True, capture_output=True)
        time.sleep(3)
    print("\n## Control plane: its leader killed (three control nodes, heartbeat 250 ms)\n")
    print("| runs | leader SIGKILLed -> a change accepted again, s (median / max) | target |")
    print("|---|---|---|")
    print(f"| {runs} | {statistics.median(times):.2f} / {max(times):.2f} | a rollout survives (tests/rollout.rs) |")


def bench_purge(work, runs=5):
    """A purge by path, from the API call to the first MISS at every edge.
    Control nodes reach edges over emulated WAN links (control-N sits in the
    Nth region); the bench polls every edge's copy of /index.html (locally,
    every ~1 ms) and notes when each stops being a HIT."""
    wdir, w = dev_world(work)
    token = open(w["token_file"]).read().strip()
    op = w["operator"]
    ctx = ssl.create_default_context(cafile=op["ca"])
    ctx.load_cert_chain(op["cert"], op["key"])
    edges = [(e["name"], int(e["url"].rsplit(":", 1)[1])) for e in w["edges"]]

    def leader():
        out = subprocess.run([MERIDIAN, "status", "--json", "--world", wdir], capture_output=True, text=True)
        try:
            return json.loads(out.stdout[out.stdout.index("{"):])["control"]["control"]["leader"]
        except (ValueError, KeyError, TypeError):
            return None

    def cache_state(port):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/index.html")
        r = c.getresponse()
        r.read()
        return r.getheader("x-meridian-cache")

    name = None
    while name is None:
        name = leader()
        time.sleep(0.1)
    url = next(u for u in w["control_url"].split(","))
    host, port = url.removeprefix("https://").rsplit(":", 1)
    delays = {l["to"]: l["one_way_delay_ms"] for l in w["links"] if l["from"] == name}
    rows = []
    for _ in range(runs):
        for _, p in edges:
            while cache_state(p) != "HIT":
                time.sleep(0.01)
        seen = {}
        t0 = time.monotonic()

        def send():
            c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
            raw = socket.create_connection((host, int(port)))
            # Headers and body go in two writes: without this, Nagle holds
            # the second until the first is acknowledged (a delayed ACK).
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sock = ctx.wrap_socket(raw, server_hostname="control.meridian")
            c.request("POST", "/v1/apps/hello/purge", body=json.dumps({"paths": ["/index.html"]}),
                      headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
            r = c.getresponse()
            seen["report"] = json.loads(r.read())

        t = threading.Thread(target=send)
        t.start()
        while len([e for e in seen if e != "report"]) < len(edges) and time.monotonic() - t0 < 10:
            for e, p in edges:
                if e not in seen and cache_state(p) != "HIT":
                    seen[e] = (time.monotonic() - t0) * 1000
        t.join()
        rows.append(seen)
        time.sleep(0.5)
    print(f"\n## Purge propagation (leader {name}; one-way delays from it over emulated links; {runs} runs)\n")
    print("| edge | one-way delay ms | first MISS after the API call, ms (median / max) | control's round trip ms (median) "
          "| target: < delay + 50 ms |")
    print("|---|---|---|---|---|")
    for e, _ in edges:
        got = [r[e] for r in rows if e in r]
        rtts = [x["ms"] for r in rows for x in r["report"]["edges"] if x["edge"] == e]
        d = delays.get(e, 0.0)
        print(f"| {e} | {d:.1f} | {statistics.median(got):.1f} / {max(got):.1f} | {statistics.median(rtts):.1f} "
              f"| {'yes' if max(got) < d + 50 else 'no'} |")
    worst = max(max(r[e] for e, _ in edges) for r in rows)
    print(f"\nAll edges purged within {worst:.1f} ms of the call (largest one-way delay from the leader: "
          f"{max(delays.values()):.1f} ms; Fastly/Cloudflare: ~150 ms).")
    per_run = ", ".join(f"{max(r[e] for e, _ in edges):.1f}" for r in rows)
    print(f"Slowest edge per run, in order (the first run opens the control node's connections to the edges: "
          f"TCP and TLS handshakes across the links): {per_run} ms.")


def build_python_components(work, n=4):
    """n distinct componentize-py components (bench/large/app.py, each with
    its own greeting), built here: `pip install componentize-py==0.17.2`."""
    import glob
    wit = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/wasmtime-wasi-http-48.0.8/wit"))
    if not wit or not shutil.which("componentize-py"):
        raise RuntimeError("needs componentize-py (pip) and the wasmtime-wasi-http 48.0.8 crate source (cargo fetch)")
    out = []
    for i in range(n):
        d = os.path.join(work, f"py{i}")
        os.makedirs(d, exist_ok=True)
        shutil.copytree(wit[0], os.path.join(d, "wit"), dirs_exist_ok=True)
        src = open(os.path.join(ROOT, "bench", "large", "app.py")).read()
        open(os.path.join(d, "app.py"), "w").write(src.replace("Hello from Python 0", f"Hello from Python {i}"))
        subprocess.run(["componentize-py", "--features", "clocks-timezone,network-error-code", "-d", "wit", "-w", "wasi:http/proxy@0.2.12", "bindings", "."],
                       cwd=d, check=True, capture_output=True)
        subprocess.run(["componentize-py", "--features", "clocks-timezone,network-error-code", "-d", "wit", "-w", "wasi:http/proxy@0.2.12", "componentize",
                        "app", "-o", f"py{i}.wasm"], cwd=d, check=True, capture_output=True)
        out.append(os.path.join(d, f"py{i}.wasm"))
    return out


def bench_large(work, duration):
    """An app of four componentize-py components: deploy to three regions
    until every one serves it, vs `wasmtime compile` of the four one after
    another; then serving one of them vs `wasmtime serve`."""
    wasms = build_python_components(work)
    mib = sum(os.path.getsize(w) for w in wasms) / 2**20
    # The peer: wasmtime compile, one after another.
    t0 = time.monotonic()
    for w in wasms:
        subprocess.run(["wasmtime", "compile", w, "-o", w + ".cwasm"], check=True, capture_output=True)
    wasmtime_s = time.monotonic() - t0
    wdir, wj = dev_world(work)
    app = os.path.join(work, "big")
    os.makedirs(os.path.join(app, "c"), exist_ok=True)
    manifest = '[app]\nname = "big"\n[limits]\nmemory_mb = 256\ndeadline_ms = 10000\n'
    for i, w in enumerate(wasms):
        shutil.copy(w, os.path.join(app, "c", f"py{i}.wasm"))
        manifest += f'[components.py{i}]\nsource = "c/py{i}.wasm"\n[[routes]]\npath = "/p{i}"\ncomponent = "py{i}"\n'
    open(os.path.join(app, "meridian.toml"), "w").write(manifest)
    subprocess.run([MERIDIAN, "apps", "create", "big", "--world", wdir], check=True, capture_output=True)
    regions = [int(r["url"].rsplit(":", 1)[1]) for r in wj["regions"]]

    def serves(port, i):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("GET", f"/p{i}", headers={"Host": "big.localhost"})
            r = c.getresponse()
            return r.status == 200 and f"Python {i}".encode() in r.read()
        except OSError:
            return False

    t0 = time.monotonic()
    subprocess.run([MERIDIAN, "deploy", app, "--world", wdir], check=True, capture_output=True)
    for port in regions:
        for i in range(len(wasms)):
            while not serves(port, i):
                time.sleep(0.05)
    meridian_s = time.monotonic() - t0
    # Serving: the region's public port vs wasmtime serve, same component.
    us = regions[0]
    script = os.path.join(work, "host.lua")
    open(script, "w").write('wrk.headers["Host"] = "big.localhost"\n')
    wt_port = free_port()
    start(["wasmtime", "serve", "-S", "cli", f"--addr=127.0.0.1:{wt_port}", wasms[0]], os.path.join(work, "wt.log"))
    wait_port(wt_port)

    def wrk_s(url, extra):
        out = subprocess.run([*LOAD_CPU, "wrk", "-t1", "-c8", f"-d{duration}s", "--latency", *extra, url],
                             capture_output=True, text=True, check=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        m = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", out)
        return rps, float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    m_rps, m_p99 = wrk_s(f"http://127.0.0.1:{us}/p0", ["-s", script])
    w_rps, w_p99 = wrk_s(f"http://127.0.0.1:{wt_port}/", [])
    print(f"\n## Large components: four componentize-py components ({mib:.0f} MiB in all)\n")
    print("| measure | Meridian | wasmtime | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| deploy to 3 regions until all serve / `wasmtime compile` x4 sequentially, s | {meridian_s:.1f} | "
          f"{wasmtime_s:.1f} | {meridian_s / wasmtime_s:.2f}x | <= 1.0x |")
    print(f"| serving one, req/s (wrk -c8, {duration}s) | {m_rps:.0f} | {w_rps:.0f} | {m_rps / w_rps:.2f}x | >= 1.0x |")
    print(f"| serving one, p99 ms | {m_p99:.1f} | {w_p99:.1f} | {m_p99 / w_p99:.2f}x | |")


def proc_tree(pid):
    """pid and all its descendants (nginx's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def cpu_ns(pid):
    """CPU time used so far by every thread of pid and its descendants, in ns
    (/proc/PID/task/TID/schedstat: time on CPU)."""
    total = 0
    for p in proc_tree(pid):
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def mean_runs(runs):
    """The mean of several wrk results: rates, percentiles and CPU averaged,
    requests and errors added up."""
    out = {}
    for k, v in runs[0].items():
        if k in ("requests", "errors"):
            out[k] = sum(r[k] for r in runs)
        elif isinstance(v, (int, float)):
            out[k] = sum(r[k] for r in runs) / len(runs)
        else:
            out[k] = "; ".join(r[k] for r in runs if r[k])
    return out


def wrk_cpu(url, duration, conns, pid, extra=()):
    """wrk against url, and the server's CPU µs per request meanwhile."""
    before = cpu_ns(pid)
    r = wrk(url, duration, conns, extra=extra)
    r["cpu_us"] = (cpu_ns(pid) - before) / 1e3 / max(r["requests"], 1)
    return r


TLB_SYMBOLS = ("flush_tlb_mm_range", "__sysvec_call_function", "__sysvec_call_function_single")


def tlb_share(pid, url, duration, conns, extra, work):
    """Profiles pid under load: the share of samples spent flushing TLBs
    (the sender's IPIs and the receivers' flushes), and the top symbols.
    The recipe: `perf record -F 2000 -g -p PID` while wrk runs, then
    `perf report --no-children --sort symbol`."""
    if not shutil.which("perf"):
        return None, []
    data = os.path.join(work, "perf.data")
    rec = subprocess.Popen(["perf", "record", "-F", "2000", "-g", "-o", data, "-p", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    subprocess.run([*LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{duration}s", *extra, url], capture_output=True, check=True)
    rec.send_signal(signal.SIGINT)
    rec.wait(timeout=60)

    def report(mode):
        return subprocess.run(["perf", "report", "-i", data, mode, "--sort", "symbol", "--stdio", "-g", "none"],
                              capture_output=True, text=True).stdout
    top = []
    for line in report("--no-children").splitlines():
        m = re.match(r"\s+([\d.]+)%\s+\[[k.]\]\s+(\S+)", line)
        if m and len(top) < 8:
            top.append(f"{m.group(2)} {float(m.group(1)):.1f}%")
    # Inclusive shares: the flushes this process asked for (with the IPIs
    # they send) and the flushes other cores' requests made it do.
    share = 0.0
    for line in report("--children").splitlines():
        m = re.match(r"\s+([\d.]+)%\s+[\d.]+%\s+\[[k.]\]\s+(\S+)", line)
        if m and m.group(2) in TLB_SYMBOLS:
            share += float(m.group(1))
    return share, top


def nginx_return_200(work):
    port = free_port()
    _, p = start_nginx(work, "nginx-native", f"""
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 "Hello, world!\\n"; }}
  }}
""")
    wait_http(port, "/", ok=lambda s: s == 200)
    return port, p.pid


POOLING_PRESETS = [
    ("madvise (wasmtime's default)", "keep_resident_kib = 0\npagemap_scan = false\nmemory_init_cow = true\n"),
    ("keep 1 MiB, memset, CoW", "keep_resident_kib = 1024\npagemap_scan = false\nmemory_init_cow = true\n"),
    ("keep 64 MiB, pagemap, CoW", "keep_resident_kib = 65536\npagemap_scan = true\nmemory_init_cow = true\n"),
    ("keep 64 MiB, pagemap, no CoW", "keep_resident_kib = 65536\npagemap_scan = true\nmemory_init_cow = false\n"),
    ("keep 64 MiB, pagemap, CoW, batch 16", "keep_resident_kib = 65536\npagemap_scan = true\nmemory_init_cow = true\n"
     "decommit_batch = 16\n"),
]


def cost_app(work):
    """The C hello at /hello and, where componentize-py is installed, the
    Python hello at /py. Returns (app dir, Python component or None)."""
    app = make_app(work)
    py = None
    if shutil.which("componentize-py"):
        try:
            py = build_python_components(work, n=1)[0]
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"(no Python component: {e})")
    if py:
        shutil.copy(py, os.path.join(app, "py.wasm"))
        with open(os.path.join(app, "meridian.toml"), "w") as f:
            f.write('[app]\nname = "bench"\n[limits]\nmemory_mb = 256\n'
                    '[components.hello]\nsource = "hello.wasm"\n[components.py]\nsource = "py.wasm"\n'
                    '[[routes]]\npath = "/hello"\ncomponent = "hello"\n'
                    '[[routes]]\npath = "/py"\ncomponent = "py"\n')
    return app, py


def bench_pooling(work, duration):
    """The region under each pooling configuration in turn (`[pooling]` in
    its config), same app and load: what chose the defaults."""
    app, py = cost_app(work)
    print(f"\n## Pooling configurations: a region serving the C hello (and the Python hello) at c16 "
          f"(wrk -t1, {duration}s each)\n")
    print("| configuration | C req/s | C CPU µs/req | C p99 ms | TLB flushing, % of samples | Python req/s "
          "| Python CPU µs/req | Python p99 ms | region RSS after, MiB | non-2xx |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, (label, cfg) in enumerate(POOLING_PRESETS):
        sub = os.path.join(work, f"pool{i}")
        os.makedirs(sub)
        stack = Stack(sub, app, region_extra="[pooling]\n" + cfg)
        wait_http(stack.region_port, "/hello", ok=lambda s: s == 200)
        pid = stack.region.pid
        c = wrk_cpu(f"http://127.0.0.1:{stack.region_port}/hello", duration, 16, pid)
        share, _ = tlb_share(pid, f"http://127.0.0.1:{stack.region_port}/hello", max(2, duration // 2), 16, (), sub)
        p = wrk_cpu(f"http://127.0.0.1:{stack.region_port}/py", duration, 16, pid) if py else None
        rss = rss_kib(pid) / 1024
        errs = c["errors"] + (p["errors"] if p else 0)
        pcols = f"{p['rps']:.0f} | {p['cpu_us']:.0f} | {p['p99_ms']:.1f}" if p else "- | - | -"
        tlb = f"{share:.1f}" if share is not None else "-"
        print(f"| {label} | {c['rps']:.0f} | {c['cpu_us']:.1f} | {c['p99_ms']:.2f} | {tlb} | {pcols} | {rss:.0f} | {errs} |")
        stop_all()
        PROCS.clear()


def bench_cost(work, duration, profile=True):
    """Cost of one function request: a region vs `wasmtime serve` (same
    component) vs a native floor (nginx `return 200`), at 1 and 16
    connections, with the server's CPU µs per request; then the 18 MB
    componentize-py hello the same way (if componentize-py is installed)."""
    app, py = cost_app(work)
    stack = Stack(work, app)
    wait_http(stack.region_port, "/hello", ok=lambda s: s == 200)
    native_port, native_pid = nginx_return_200(work)
    wt_port = free_port()
    wt = start(["wasmtime", "serve", "--addr", f"127.0.0.1:{wt_port}", HELLO], os.path.join(work, "wasmtime.log"))
    wait_http(wt_port, "/", ok=lambda s: s == 200)
    targets = [("native", f"http://127.0.0.1:{native_port}/", native_pid),
               ("wasmtime", f"http://127.0.0.1:{wt_port}/", wt.pid),
               ("meridian", f"http://127.0.0.1:{stack.region_port}/hello", stack.region.pid)]
    print(f"\n## Cost per function request: region vs `wasmtime serve` vs native nginx `return 200` "
          f"({os.path.basename(HELLO)}, {os.path.getsize(HELLO) // 1024} KiB C guest; wrk -t1, {duration}s, "
          f"two rounds alternated, mean)\n")
    print("| connections | native req/s | wasmtime req/s | meridian req/s | meridian/native | meridian/wasmtime "
          "| native CPU µs/req | wasmtime CPU µs/req | meridian CPU µs/req | meridian p50 / p99 ms | non-2xx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for conns in (1, 16):
        got = {name: [] for name, _, _ in targets}
        for _ in range(2):
            for name, url, pid in targets:
                got[name].append(wrk_cpu(url, duration, conns, pid))
        mean = {n: {k: statistics.mean(r[k] for r in rs) for k in ("rps", "cpu_us", "p50_ms", "p99_ms")}
                for n, rs in got.items()}
        errs = sum(r["errors"] for rs in got.values() for r in rs)
        n, w, m = mean["native"], mean["wasmtime"], mean["meridian"]
        print(f"| {conns} | {n['rps']:.0f} | {w['rps']:.0f} | {m['rps']:.0f} | {ratio(m['rps'], n['rps'])} | "
              f"{ratio(m['rps'], w['rps'])} | {n['cpu_us']:.1f} | {w['cpu_us']:.1f} | {m['cpu_us']:.1f} | "
              f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f} | {errs} |")
    print(f"\nResident memory after these runs: region {rss_kib(stack.region.pid) / 1024:.0f} MiB, "
          f"wasmtime serve {rss_kib(wt.pid) / 1024:.0f} MiB.")
    if profile:
        share, top = tlb_share(stack.region.pid, f"http://127.0.0.1:{stack.region_port}/hello", duration, 16, (), work)
        if share is not None:
            print(f"\nProfile of the region at c16 (`perf record -F 2000 -g -p PID`): TLB flushing "
                  f"({' + '.join(TLB_SYMBOLS)}, inclusive) {share:.1f} % of samples; top symbols: {'; '.join(top)}.")
    if py:
        pwt_port = free_port()
        pwt = start(["wasmtime", "serve", "-S", "cli", f"--addr=127.0.0.1:{pwt_port}", py],
                    os.path.join(work, "wasmtime-py.log"))
        wait_http(pwt_port, "/", ok=lambda s: s == 200)
        print(f"\n## The same for an {os.path.getsize(py) / 2**20:.0f} MiB componentize-py hello "
              f"(wrk -t1, {duration}s, two rounds alternated, mean)\n")
        print("| connections | wasmtime req/s | meridian req/s | meridian/wasmtime | wasmtime CPU µs/req "
              "| meridian CPU µs/req | wasmtime p99 ms | meridian p99 ms | non-2xx |")
        print("|---|---|---|---|---|---|---|---|---|")
        for conns in (1, 16):
            ws, ms = [], []
            for _ in range(2):
                ws.append(wrk_cpu(f"http://127.0.0.1:{pwt_port}/", duration, conns, pwt.pid))
                ms.append(wrk_cpu(f"http://127.0.0.1:{stack.region_port}/py", duration, conns, stack.region.pid))
            w = {k: statistics.mean(r[k] for r in ws) for k in ("rps", "cpu_us", "p99_ms")}
            m = {k: statistics.mean(r[k] for r in ms) for k in ("rps", "cpu_us", "p99_ms")}
            errs = sum(r["errors"] for r in ws + ms)
            print(f"| {conns} | {w['rps']:.0f} | {m['rps']:.0f} | {ratio(m['rps'], w['rps'])} | {w['cpu_us']:.0f} | "
                  f"{m['cpu_us']:.0f} | {w['p99_ms']:.1f} | {m['p99_ms']:.1f} | {errs} |")
        print(f"\nResident memory after these runs: region {rss_kib(stack.region.pid) / 1024:.0f} MiB (both components), "
              f"wasmtime serve {rss_kib(pwt.pid) / 1024:.0f} MiB.")


PUT_LUA = """
counter = 0
local body = string.rep("v", 100)
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/kv/sessions/k" .. counter .. "-" .. math.random(1000000000), nil, body)
end
delay = function() return DELAY end
"""


def kv_status(wdir, w, region):
    """A region's kv status from its cluster port, as the world's operator."""
    return json.loads(region_get(w, region, "/_meridian/apps/hello/kv/status"))


def kv_digest(wdir, w, region, ns):
    """A namespace's digest in a region (None if the region does not answer)."""
    try:
        return region_get(w, region, f"/_meridian/apps/hello/kv/digest/{ns}")
    except OSError:
        return None


def region_get(w, region, path):
    """GET on a region's cluster port, as the world's operator; the body."""
    op = w["operator"]
    ctx = ssl.create_default_context(cafile=op["ca"])
    ctx.load_cert_chain(op["cert"], op["key"])
    url = next(r["cluster_url"] for r in w["regions"] if r["name"] == region)
    host, port = url.rsplit("/", 1)[1].split(":")
    c = http.client.HTTPSConnection(host, int(port), timeout=10, context=ctx)
    # The certificate names the region, not the address.
    c.sock = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10),
                             server_hostname=f"{region}.region.meridian")
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    if r.status != 200:
        raise OSError(f"{region} {path}: HTTP {r.status}")
    return body


def bench_replication(work, duration, delay_ms=40):
    """Replication lag eu-west -> us-east over a link with one-way delay D,
    at ~1,000 writes/s and at the most this machine does (target 10,000)."""
    rows = []
    for label, conns, lua_delay in [("~1,000/s", 10, 10), ("max (target 10,000/s)", 64, 0)]:
        sub = tempfile.mkdtemp(prefix="repl-", dir=work)
        wdir, w = dev_world(sub, ["--anti-entropy-ms", "600000"])
        subprocess.run([MERIDIAN, "chaos", "latency", "eu-west", "us-east", str(delay_ms), "--world", wdir],
                       check=True, capture_output=True)
        eu = next(r["url"] for r in w["regions"] if r["name"] == "eu-west")
        script = os.path.join(sub, "put.lua")
        open(script, "w").write(PUT_LUA.replace("DELAY", str(lua_delay)))
        before = kv_status(wdir, w, "us-east")
        out = subprocess.run([*LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-s", script, eu + "/"],
                             capture_output=True, text=True, check=True).stdout
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        # Let the tail drain, then read the lag the receiver measured.
        time.sleep(3)
        st = kv_status(wdir, w, "us-east")
        o = next(o for o in st["origins"] if o["origin"] == "eu-west")
        rows.append((label, rate, int(non2xx.group(1)) if non2xx else 0, o["lag_ms_p50"], o["lag_ms_p99"], o["lag_samples"]))
        stop_all()
        PROCS.clear()
    print(f"\n## Replication lag, eu-west -> us-east, link one-way delay D = {delay_ms} ms ({duration} s per rate)\n")
    print("Writes: PUT of a 100-byte value through the kv function in eu-west (wrk); lag measured by us-east for every")
    print("record: applied (committed) there minus the record's HLC wall time (taken just before the local commit, so")
    print("this includes eu-west's own fsync and is an upper bound of applied-remotely minus acknowledged-locally; ms")
    print("resolution).\n")
    print("| write rate | achieved writes/s | failed | lag p50 ms | lag p99 ms | samples | target p99 |")
    print("|---|---|---|---|---|---|---|")
    for label, rate, failed, p50, p99, n in rows:
        print(f"| {label} | {rate:.0f} | {failed} | {p50:.1f} | {p99:.1f} | {n} | <= {delay_ms + 10} |")


def bench_idle(work, sizes=(20000, 130000), watch=20):
    """What holding keys costs when nothing happens: N keys written into
    eu-west's `sessions` namespace through the kv function (replicated to
    every region), then every region's CPU over `watch` s with no traffic
    (anti-entropy every 3 s, tombstone collection every 2 s as configured
    by `meridian dev`). With MERIDIAN_BEFORE=path/to/an/older/meridian, the
    same for that build, in the same run."""
    global MERIDIAN
    builds = [("this build", MERIDIAN)]
    if os.environ.get("MERIDIAN_BEFORE"):
        builds.insert(0, ("before", os.environ["MERIDIAN_BEFORE"]))
    this = MERIDIAN
    rows = []
    for n, (build, binary) in [(n, b) for n in sizes for b in builds]:
        MERIDIAN = binary
        sub = tempfile.mkdtemp(prefix="idle-", dir=work)
        wdir, w = dev_world(sub)
        eu = next(r["url"] for r in w["regions"] if r["name"] == "eu-west")
        script = os.path.join(sub, "put.lua")
        open(script, "w").write(PUT_LUA.replace("DELAY", "0"))
        t0 = time.time()
        load = subprocess.Popen([*LOAD_CPU, "wrk", "-t1", "-c32", "-d900s", "-s", script, eu + "/"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while kv_status(wdir, w, "eu-west")["last_seq"] < n:
                time.sleep(0.5)
        finally:
            load.terminate()
            load.wait()
        load_s = time.time() - t0
        # Replicated everywhere before watching.
        deadline = time.time() + 300
        while time.time() < deadline:
            st = kv_status(wdir, w, "eu-west")
            if st["peers"] and all(p["pending"] == 0 for p in st["peers"]):
                break
            time.sleep(0.5)
        held = kv_status(wdir, w, "eu-west")["last_seq"]
        time.sleep(3)
        pids = {p["name"]: p["pid"] for p in w["processes"] if p.get("role") == "region" and p.get("pid")}
        before = {name: cpu_ns(pid) for name, pid in pids.items()}
        time.sleep(watch)
        idle = {name: (cpu_ns(pid) - before[name]) / 1e9 / watch * 100 for name, pid in pids.items()}
        rows.append((build, held, load_s, idle))
        stop_all()
        PROCS.clear()
    MERIDIAN = this
    print(f"\n## Idle cost of keys held (keys written through the kv function in eu-west, then {watch} s "
          f"with no traffic)\n")
    print("| build | keys held | load time s | idle CPU per region, % of one core |")
    print("|---|---|---|---|")
    for build, held, load_s, idle in rows:
        per = ", ".join(f"{name} {pct:.1f}" for name, pct in sorted(idle.items()))
        print(f"| {build} | {held} | {load_s:.0f} | {per} |")


def import_keys(wdir, n, region="eu-west", ns="sessions"):
    """`meridian kv import` of n keys (100-byte values) into `ns` in `region`,
    fed from a generator on stdin; returns the seconds it took."""
    t0 = time.time()
    p = subprocess.Popen([MERIDIAN, "kv", "import", "--world", wdir, "--ns", ns, "--region", region, "-"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    value = "v" * 100
    for i in range(n):
        p.stdin.write(f'{{"key": "user-{i:08d}", "value": "{value}"}}\n')
    p.stdin.close()
    out = p.stdout.read()
    if p.wait() != 0:
        raise RuntimeError(f"import failed: {out}")
    return time.time() - t0


def hwm_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def bench_scale(work, duration=10, sizes=(10_000, 100_000, 1_000_000, 5_000_000), watch=20):
    """What the data held costs (issue 8's table): for each size, a fresh dev
    world, N keys imported into eu-west's `sessions` (`meridian kv import`)
    and replicated everywhere; then every region's CPU over `watch` s with
    no traffic; then PUTs through the kv function in eu-west (wrk, 4
    connections, 1 ms pause each) for `duration` s; then ap-southeast
    killed, its data deleted and restarted: time until its digest equals
    eu-west's, and its peak memory meanwhile."""
    sizes = [int(x) for x in os.environ.get("SCALE_SIZES", "").split(",") if x] or sizes
    rows = []
    for n in sizes:
        sub = tempfile.mkdtemp(prefix="scale-", dir=work)
        wdir, w = dev_world(sub, ["--anti-entropy-ms", "3000"])
        load_s = import_keys(wdir, n)
        deadline = time.time() + 1800
        while time.time() < deadline:
            st = kv_status(wdir, w, "eu-west")
            if st["peers"] and all(p["pending"] == 0 for p in st["peers"]) and st["log_len"] == 0:
                break
            time.sleep(0.5)
        # And the background work the load left (the trees' journals).
        while time.time() < deadline:
            if all(kv_status(wdir, w, r["name"]).get("tree_journal_pending", 0) == 0 for r in w["regions"]):
                break
            time.sleep(0.5)
        time.sleep(3)
        w = json.load(open(os.path.join(wdir, "world.json")))
        pids = {p["name"]: p["pid"] for p in w["processes"] if p.get("role") == "region" and p.get("pid")}
        before = {name: cpu_ns(pid) for name, pid in pids.items()}
        time.sleep(watch)
        idle = {name: (cpu_ns(pid) - before[name]) / 1e9 / watch * 100 for name, pid in pids.items()}
        eu = next(r["url"] for r in w["regions"] if r["name"] == "eu-west")
        script = os.path.join(sub, "put.lua")
        open(script, "w").write(PUT_LUA.replace("DELAY", "1"))
        put = wrk(eu + "/", duration, conns=4, extra=("-s", script))
        # Catch-up of a wiped region.
        subprocess.run([MERIDIAN, "chaos", "kill", "ap-southeast", "--world", wdir], check=True, capture_output=True)
        shutil.rmtree(os.path.join(wdir, "data", "ap-southeast"), ignore_errors=True)
        t0 = time.time()
        subprocess.run([MERIDIAN, "chaos", "restart", "ap-southeast", "--world", wdir], check=True,
                       capture_output=True)
        w = json.load(open(os.path.join(wdir, "world.json")))
        pid = next(p["pid"] for p in w["processes"] if p["name"] == "ap-southeast")
        want = kv_digest(wdir, w, "eu-west", "sessions")
        catch_s, peak = None, 0
        while time.time() - t0 < 1800:
            peak = max(peak, hwm_kib(pid))
            if kv_digest(wdir, w, "ap-southeast", "sessions") == want:
                catch_s = time.time() - t0
                break
            time.sleep(0.2)
        peak = max(peak, hwm_kib(pid))
        data_mib = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                       os.walk(os.path.join(wdir, "data", "ap-southeast")) for f in fs) >> 20
        rows.append((n, load_s, idle, put, catch_s, peak >> 10, data_mib))
        stop_all()
        PROCS.clear()
        shutil.rmtree(sub, ignore_errors=True)
    print("\n## Cost of data held (keys imported into eu-west, replicated to every region)\n")
    print("| keys held | import s | idle CPU per region, % of one core | PUT p50 / p99 ms (req/s) "
          "| wiped region catch-up s | its peak RSS MiB | its data MiB |")
    print("|---|---|---|---|---|---|---|")
    for n, load_s, idle, put, catch_s, peak, data_mib in rows:
        per = ", ".join(f"{name} {pct:.1f}" for name, pct in sorted(idle.items()))
        c = f"{catch_s:.1f}" if catch_s is not None else "not caught up in 30 min"
        print(f"| {n} | {load_s:.0f} | {per} | {put['p50_ms']:.2f} / {put['p99_ms']:.2f} ({put['rps']:.0f}) "
              f"| {c} | {peak} | {data_mib} |")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


PACED_LUA = """
local hosts = {HOSTS}
local i = 0
request = function()
  i = i + 1
  wrk.headers["Host"] = hosts[(i % #hosts) + 1]
  return wrk.format("GET", "/hello")
end
delay = function() return DELAY end
"""


def paced_wrk(work, name, url, hosts, conns, delay_ms, duration):
    """wrk at a paced rate (each connection waits delay_ms between requests),
    rotating the Host header over `hosts`; returns wrk()'s numbers."""
    script = os.path.join(work, f"{name}.lua")
    open(script, "w").write(PACED_LUA.replace("HOSTS", ", ".join(f'"{h}"' for h in hosts))
                            .replace("DELAY", str(delay_ms)))
    out = subprocess.run([*LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        return v * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": pct(50),
            "p99_ms": pct(99), "errors": int(non2xx.group(1)) if non2xx else 0}


def bench_density(work, duration, apps=100):
    """100 small apps in one dev world: resident memory each idle app adds to a
    region, and one app's p99 while the 99 others take traffic."""
    wdir, w = dev_world(work)
    regions = {r["name"]: next(p["pid"] for p in w["processes"] if p["name"] == r["name"]) for r in w["regions"]}
    time.sleep(3)
    before = {n: rss_kib(pid) for n, pid in regions.items()}
    t0 = time.time()
    for i in range(apps):
        name = f"app{i:03d}"
        d = os.path.join(work, name)
        os.makedirs(d, exist_ok=True)
        shutil.copy(HELLO, os.path.join(d, "hello.wasm"))
        with open(os.path.join(d, "meridian.toml"), "w") as f:
            f.write(f'[app]\nname = "{name}"\n[limits]\nmemory_mb = 16\n[components.hello]\nsource = "hello.wasm"\n'
                    '[[routes]]\npath = "/hello"\ncomponent = "hello"\n')
        for args in (["apps", "create", name], ["deploy", d]):
            subprocess.run([MERIDIAN, *args, "--world", wdir], check=True, capture_output=True)
    created_s = time.time() - t0
    time.sleep(5)
    after = {n: rss_kib(pid) for n, pid in regions.items()}
    us = next(r["url"] for r in w["regions"] if r["name"] == "us-east")
    one, others = ["app000.localhost"], [f"app{i:03d}.localhost" for i in range(1, apps)]
    # Warm every app once (first instantiation), then measure.
    paced_wrk(work, "warm", us, one + others, 4, 0, 3)
    alone = paced_wrk(work, "alone", us, one, 2, 5, duration)
    result = {}

    def beside(noise_hosts, key):
        def noise():
            result[key] = paced_wrk(work, key, us, noise_hosts, 8, 5, duration + 2)

        t = threading.Thread(target=noise)
        t.start()
        time.sleep(1)
        r = paced_wrk(work, f"{key}-measured", us, one, 2, 5, duration)
        t.join()
        return r

    shared = beside(others, "others")
    # Control: the same extra traffic, but to app000 itself: what the load
    # alone costs, with no other app involved.
    same_load = beside(one, "self")
    print(f"\n## Density: {apps} apps in one dev world (release build, hello.wasm per app)\n")
    print(f"Created and deployed {apps} apps in {created_s:.0f} s (`meridian apps create` + `meridian deploy` each).\n")
    print("| region | RSS before (MiB) | RSS with 100 more apps (MiB) | per idle app (KiB) | target |")
    print("|---|---|---|---|---|")
    for n in regions:
        per = (after[n] - before[n]) / apps
        print(f"| {n} | {before[n] / 1024:.1f} | {after[n] / 1024:.1f} | {per:.0f} | < 2048 |")
    o = result["others"]
    print(f"\nNoisy neighbour, us-east's public port: app000 paced at 2 connections x 5 ms "
          f"({duration} s), alone and while app001-app{apps - 1:03d} take {o['rps']:.0f} req/s "
          f"(8 connections x 5 ms, Host rotating over the 99).\n")
    print("| app000 | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for label, r in [("alone", alone), ("next to 99 busy apps", shared),
                     ("control: alone, the same extra load sent to app000 itself", same_load)]:
        print(f"| {label} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    print(f"| ratio next to 99 apps / alone (target <= 1.2x) | | {ratio(shared['p50_ms'], alone['p50_ms'])} "
          f"| {ratio(shared['p99_ms'], alone['p99_ms'])} | |")
    print(f"| ratio next to 99 apps / same load on one app | | {ratio(shared['p50_ms'], same_load['p50_ms'])} "
          f"| {ratio(shared['p99_ms'], same_load['p99_ms'])} | |")
    print(f"\nThe 99 others: {o['rps']:.0f} req/s, p99 {o['p99_ms']:.2f} ms, errors {o['errors']}.")


def bench_kv_get(work, duration, rounds=20, gets=2000):
    """A function's local get, timed inside the guest around each call."""
    wdir, w = dev_world(work)
    eu = next(r["url"] for r in w["regions"] if r["name"] == "eu-west")
    host, port = eu.rsplit("/", 1)[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("PUT", "/kv/sessions/bench-key", body=b"x" * 100)
    c.getresponse().read()
    p50s, p99s = [], []
    for _ in range(rounds):
        c.request("GET", f"/kv/sessions/bench-key?bench={gets}")
        body = c.getresponse().read().decode()
        m = re.search(r"p50_ns=(\d+) p99_ns=(\d+)", body)
        p50s.append(int(m.group(1)) / 1000)
        p99s.append(int(m.group(2)) / 1000)
    print(f"\n## A function's local key-value get ({rounds} requests x {gets} gets of a 100-byte value, "
          "timed inside the guest around each wasi:keyvalue call)\n")
    print("| p50 µs (median of requests) | p99 µs (median of requests) | worst request p50 µs | target p50 |")
    print("|---|---|---|---|")
    print(f"| {statistics.median(p50s):.1f} | {statistics.median(p99s):.1f} | {max(p50s):.1f} | < 50 µs |")


def bench_strong(work, writes=100):
    """Strong-namespace write latency vs the round trip to the nearest quorum."""
    wdir, w = dev_world(work)
    delay = {(l["from"], l["to"]): l["one_way_delay_ms"] for l in w["links"]}
    rtt = lambda a, b: 2 * delay[(a, b)]
    regions = [r["name"] for r in w["regions"]]
    # Wait for the preferred leader (us-east) to lead.
    deadline = time.time() + 60
    while time.time() < deadline:
        leaders = {g["leader"] for r in regions for g in kv_status(wdir, w, r).get("groups", [])}
        if leaders == {"us-east"}:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"the ledger group has no common leader: {leaders}")
    time.sleep(2)
    leader = "us-east"
    followers = [r for r in regions if r != leader]
    rows = []
    for region in regions:
        url = next(r["url"] for r in w["regions"] if r["name"] == region)
        host, port = url.rsplit("/", 1)[1].split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        lat, failed = [], 0
        for i in range(writes + 5):
            t = time.perf_counter()
            c.request("PUT", f"/kv/ledger/bench-{region}", body=str(i).encode())
            r = c.getresponse()
            r.read()
            if r.status != 200:
                failed += 1
                continue
            if i >= 5:
                lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        quorum = min(rtt(leader, f) for f in followers)
        floor = quorum + (0 if region == leader else rtt(region, leader))
        rows.append((region, statistics.median(lat), lat[int(len(lat) * 0.99) - 1], floor, failed))
    print(f"\n## strong namespace write latency vs the nearest quorum round trip ({writes} sequential writes per region,"
          " leader us-east, direct to each region)\n")
    print("| writing region | p50 ms | p99 ms | floor ms (to leader + leader to nearest follower and back) | p50 / floor | failed |")
    print("|---|---|---|---|---|---|")
    for region, p50, p99, floor, failed in rows:
        print(f"| {region} | {p50:.1f} | {p99:.1f} | {floor:.0f} | {p50 / floor:.2f} | {failed} |")


def bench_strong_failover(work, runs=3):
    """Strong namespace: time from killing or cutting off the leader region to
    a new leader, and to the first successful write in each other region
    (fresh writes to every region every 50 ms, each on its own thread)."""
    import threading
    wdir, w = dev_world(work)
    regions = [r["name"] for r in w["regions"]]
    url = {r["name"]: r["url"] for r in w["regions"]}

    def leaders(among):
        out = set()
        for r in among:
            try:
                out |= {g["leader"] for g in kv_status(wdir, w, r).get("groups", [])}
            except Exception:
                out.add(None)
        return out

    def common(among, not_=None, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ls = leaders(among)
            if len(ls) == 1 and None not in ls and not_ not in ls:
                return ls.pop()
            time.sleep(0.05)
        raise RuntimeError(f"no common leader among {among}")

    def put(region, key, out, fault_at):
        host, port = url[region].rsplit("/", 1)[1].split(":")
        sent = time.time()
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=10)
            c.request("PUT", f"/kv/ledger/{key}", body=b"1")
            r = c.getresponse()
            r.read()
            if r.status == 200 and sent >= fault_at:
                out.append((region, time.time() - fault_at))
        except Exception:
            pass

    rows = []
    for run in range(runs):
        for fault in ("kill", "isolate"):
            leader = common(regions)
            time.sleep(1)
            others = [r for r in regions if r != leader]
            done, threads = [], []
            fault_at = time.time()
            if fault == "kill":
                subprocess.run([MERIDIAN, "chaos", "kill", leader, "--world", wdir], check=True, capture_output=True)
            else:
                for r in others:
                    subprocess.run([MERIDIAN, "chaos", "cut", leader, r, "--world", wdir], check=True, capture_output=True)
            new_leader, elected = None, None
            while time.time() - fault_at < 8:
                for r in others:
                    t = threading.Thread(target=put, args=(r, f"fo-{run}-{r}", done, fault_at))
                    t.start()
                    threads.append(t)
                if elected is None and (time.time() - fault_at) > 0.5:
                    ls = leaders(others)
                    if len(ls) == 1 and None not in ls and leader not in ls:
                        new_leader, elected = ls.pop(), time.time() - fault_at
                time.sleep(0.05)
            for t in threads:
                t.join()
            first = {r: min((d for x, d in done if x == r), default=None) for r in others}
            rows.append((fault, leader, new_leader, elected, first))
            if fault == "kill":
                subprocess.run([MERIDIAN, "chaos", "restart", leader, "--world", wdir], check=True, capture_output=True)
            else:
                for r in others:
                    subprocess.run([MERIDIAN, "chaos", "heal", leader, r, "--world", wdir], check=True, capture_output=True)
            time.sleep(3)
    print(f"\n## strong namespace failover ({runs} kills and {runs} isolations of the leader region; default world, "
          "longest round trip 213 ms; lease 1.2 s + 100 ms per rank)\n")
    print("| fault | old leader | new leader | leader seen after s (status polled, coarse) | first successful write after s, per region |")
    print("|---|---|---|---|---|")
    for fault, old, new, elected, first in rows:
        writes = ", ".join(f"{r} {d:.2f}" if d is not None else f"{r} none" for r, d in first.items())
        print(f"| {fault} | {old} | {new} | {elected:.2f} | {writes} |" if elected else f"| {fault} | {old} | - | none in 8 s | {writes} |")
    worst = [d for *_, first in rows for d in first.values() if d is not None]
    if worst:
        print(f"\nfirst successful write in every surviving region: median {statistics.median(worst):.2f} s, max {max(worst):.2f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="?", default="all", choices=["all", "host", "cost", "pooling", "idle", "edge", "cache", "plan", "purge", "failover", "deploy", "replication", "kvget", "strong", "strongfailover",
                                                         "density", "rollout", "large", "control", "scale"])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep each benchmark's work directory (logs, data)")
    a = ap.parse_args()
    # A SIGTERM unwinds like an error, so `finally` stops what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not os.path.exists(MERIDIAN):
        sys.exit("build first: cargo build --release")
    print(f"# Meridian benchmarks, {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores")
    # The environment knobs that change what runs, so a result says how to
    # get it again.
    knobs = "".join(f"{k}={os.environ[k]} " for k in ("BENCH_PIN", "EDGE_WORKERS", "EDGE_THREADS", "MERIDIAN_BEFORE")
                    if os.environ.get(k))
    print(f"\nCommand: `{knobs}python3 bench/bench.py {' '.join(sys.argv[1:])}`")
    try:
        for name, fn in [("host", bench_host), ("cost", bench_cost), ("pooling", bench_pooling), ("idle", bench_idle), ("edge", bench_edge), ("cache", bench_cache),
                         ("plan", lambda work: bench_plan()), ("purge", bench_purge), ("failover", bench_failover),
                         ("deploy", bench_deploy), ("replication", bench_replication), ("kvget", bench_kv_get),
                         ("strong", bench_strong), ("strongfailover", bench_strong_failover), ("density", bench_density), ("rollout", bench_rollout),
                         ("large", bench_large), ("control", bench_control), ("scale", bench_scale)]:
            if a.which in ("all", name):
                work = tempfile.mkdtemp(prefix=f"meridian-bench-{name}-")
                if name in ("host", "cost", "pooling", "edge", "cache", "replication", "kvget", "density", "large", "scale"):
                    fn(work, a.duration)
                else:
                    fn(work)
                stop_all()
                PROCS.clear()
                if not a.keep:
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        stop_all()


if __name__ == "__main__":
    main()
