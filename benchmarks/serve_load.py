"""Load test of ``latentdiff serve`` on loopback: many A1111 txt2img requests from concurrent clients against a
small queue. Every request must end in its image (200, a decodable PNG) or a 429 with Retry-After: none lost, none
hung; the server's peak RSS (VmHWM) is read from /proc, and the server must still answer afterwards.

The server is a separate process (``python -m latentdiff.cli serve``), so its memory is its own.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/serve_load.py [--requests 200] [--clients 20] [--queue 4]
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> tuple:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--queue", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=300, help="a request open this long counts as hung")
    args = ap.parse_args()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "latentdiff.cli", "serve", "--port", str(port), "--queue-size",
                               str(args.queue)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        print(server.stdout.readline().strip())
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/api/info", timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)
        idle_rss = vm(server.pid, "VmRSS")
        outcomes: collections.Counter = collections.Counter()
        lock, latencies = threading.Lock(), []
        body = {"prompt": "a small blue square", "width": 32, "height": 32, "steps": args.steps, "seed": 1}

        def client(n: int) -> None:
            for _ in range(n):
                t = time.perf_counter()
                try:
                    status, data, headers = post(f"{url}/sdapi/v1/txt2img", body, args.timeout)
                except OSError as e:  # a timeout or a dropped connection: lost
                    status, data, headers = f"error {type(e).__name__}", b"", {}
                kind = str(status)
                if status == 200:
                    Image.open(io.BytesIO(base64.b64decode(json.loads(data)["images"][0]))).load()
                    kind = "200 image"
                elif status == 429:
                    kind = "429 (Retry-After %s)" % ("given" if int(headers.get("Retry-After", 0)) >= 1 else "MISSING")
                with lock:
                    outcomes[kind] += 1
                    latencies.append(time.perf_counter() - t)

        per = [args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in per]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        peak = vm(server.pid, "VmHWM")
        status, data, _ = post(f"{url}/sdapi/v1/txt2img", body, 120)
        healthy = status == 200 and json.loads(data)["images"]
        print(f"{args.requests} requests from {args.clients} clients, queue {args.queue} (+1 running), "
              f"{args.steps} steps, 32x32, default model; {wall:.1f} s wall")
        print("| outcome | requests |\n|---|---:|")
        for kind, n in sorted(outcomes.items()):
            print(f"| {kind} | {n} |")
        lost = args.requests - sum(outcomes.values())
        print(f"| lost (no answer) | {lost} |")
        print(f"\nslowest answer {max(latencies):.2f} s; server RSS idle {idle_rss:.0f} MiB, peak {peak:.0f} MiB; "
              f"healthy after: {'yes' if healthy else 'NO'}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
