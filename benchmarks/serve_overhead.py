"""Overhead of the server per image: ``Pipeline.generate`` called directly vs the same generation through the own
API (``/api/generate?wait=true``) and the A1111 API (``/sdapi/v1/txt2img``) on loopback, on the default model.

The server runs in this process (uvicorn in a thread, as the tests run it); requests go one at a time, so the
difference is what the HTTP layer, the queue, PNG encoding and base64 add.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/serve_overhead.py [--n 20] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _serve import running

import latentdiff
from latentdiff.serve.app import ServeConfig


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    pipe = latentdiff.load("default")
    prompt = "a large red circle on the left"
    pipe.generate(prompt, steps=args.steps)  # warm up
    rows = {"Pipeline.generate (direct)": timed(lambda i: pipe.generate(prompt, steps=args.steps, seed=i), args.n)}
    with running(pipe, ServeConfig()) as (url, _):
        post(f"{url}/api/generate?wait=true", {"prompt": prompt, "steps": args.steps})
        rows["own API /api/generate?wait=true"] = timed(
            lambda i: post(f"{url}/api/generate?wait=true", {"prompt": prompt, "steps": args.steps, "seed": i}),
            args.n)
        rows["A1111 /sdapi/v1/txt2img"] = timed(
            lambda i: post(f"{url}/sdapi/v1/txt2img", {"prompt": prompt, "steps": args.steps, "seed": i,
                                                       "width": 32, "height": 32, "sampler_name": "dpmpp_2m",
                                                       "cfg_scale": pipe.settings().guidance}), args.n)
    base = statistics.median(rows["Pipeline.generate (direct)"])
    print(f"default model, 32x32, {args.steps} steps, {args.n} images each, one at a time")
    print("| path | median ms / image | min ms | overhead vs direct (median) |\n|---|---:|---:|---:|")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"| {name} | {med * 1e3:.1f} | {min(times) * 1e3:.1f} | {(med - base) * 1e3:+.1f} ms |")


if __name__ == "__main__":
    main()
