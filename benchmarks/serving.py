"""Serving throughput of the victim: raw forward pass vs. Ray Serve with the full pipeline.

    python benchmarks/serving.py [--seconds 10] [--clients 4] [--batch 64] [--out benchmarks/results/serving.json]

Measures, in one run on this machine:
  - raw: batched forward passes of the victim in one process, all cores (images/s, best of 3 windows);
  - served: --clients actors sending batches of --batch images through DeploymentHandles, for each of
    (query log on/off) x (PRADA on/off): images/s, p50/p99 request latency, served / raw;
  - the log's overhead: 1 - served(log on) / served(log off).
With 2 replicas each keeps its own PRADA history (the simulator itself refuses that configuration); the
per-query cost measured is the same. Results are printed and written as JSON and as a Markdown table beside it
(``--out`` with ``.md``); ``--report-only`` rewrites the table from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import ray
import torch


@ray.remote(num_cpus=0)
class BenchClient:
    def __init__(self, app: str, key: str, images: np.ndarray):
        from ray import serve

        torch.set_num_threads(1)
        self.handle = serve.get_deployment_handle("victim", app)
        self.key, self.images = key, images

    def run(self, seconds: float, batch: int) -> dict:
        rng = np.random.default_rng(0)
        lat, n = [], 0
        self.handle.query.remote(self.key, self.images[:batch]).result()  # warm up
        end = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < end:
            idx = rng.integers(0, len(self.images), batch)
            t = time.perf_counter()
            reply = self.handle.query.remote(self.key, self.images[idx]).result()
            lat.append(time.perf_counter() - t)
            n += len(reply.answered)
        return {"images": n, "seconds": time.perf_counter() - start, "latencies": lat}


def raw_throughput(model, images: np.ndarray, batch: int, seconds: float) -> float:
    """Best of three windows (the machine is noisy; the best is the conservative denominator)."""
    return max(_raw_window(model, images, batch, seconds / 3) for _ in range(3))


def _raw_window(model, images: np.ndarray, batch: int, seconds: float) -> float:
    from sim.training import to_float

    torch.set_num_threads(os.cpu_count() or 1)
    x = to_float(images[:batch])
    with torch.inference_mode():
        for _ in range(5):
            torch.softmax(model(x), 1)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.softmax(model(x), 1)
            n += batch
    return n / (time.perf_counter() - start)


def served(victim, images, *, log: bool, prada: bool, clients: int, batch: int, seconds: float,
           replicas: int = 1, threads: int = 1, defense: dict | None = None,
           defense_models: dict | None = None) -> dict:
    from ray import serve

    from sim.protocol import Account
    from sim.serving import VictimSpec, deploy

    keys = {f"key-{i}": Account(f"acct-{i}", "attacker", "bench") for i in range(clients)}
    tmp = tempfile.mkdtemp(prefix="bench-log-")
    ds = victim.dataset
    spec = VictimSpec(victim="bench", run_id="bench", input_shape=ds.input_shape, accounts=keys,
                      model=victim.to_bytes(),
                      detectors={"prada": {"kind": "prada", "params": {"delta": 0.95, "min_pool": 50}}}
                      if prada else {},
                      rules={}, defense=defense or {"name": "identity"},
                      log_dir=tmp if log else None, log_inputs=True, max_images=max(256, batch), threads=threads,
                      defense_models=defense_models or {})
    app = f"bench-{int(log)}{int(prada)}"
    deploy(spec, app, replicas=replicas, replica_cpus=1 / replicas, max_ongoing_requests=128)
    actors = [BenchClient.remote(app, k, images) for k in keys]
    out = ray.get([a.run.remote(seconds, batch) for a in actors])
    serve.delete(app)
    total = sum(o["images"] for o in out)
    secs = max(o["seconds"] for o in out)
    lat = np.concatenate([o["latencies"] for o in out]) * 1e3
    return {"log": log, "prada": prada, "images_per_s": round(total / secs, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "requests": int(len(lat))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=2, help="Serve replicas of the victim")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serving.json"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown table from --out's JSON")
    args = ap.parse_args()
    if args.report_only:
        with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
            fh.write(table(json.load(open(args.out))))
        return

    from sim import config, zoo

    cfg = config.load("distributed_knockoff")
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    images = victim.dataset.x_test
    raw = raw_throughput(victim.model, images, args.batch, args.seconds)
    print(f"raw forward ({os.cpu_count()} threads, batch {args.batch}): {raw:,.0f} images/s", flush=True)

    from sim.engine import init_local_ray

    init_local_ray(num_cpus=os.cpu_count())
    from ray import serve

    serve.start(http_options={"location": "NoServer"})
    rows = []
    for prada in (False, True):
        for log in (False, True):
            r = served(victim, images, log=log, prada=prada, clients=args.clients, batch=args.batch,
                       seconds=args.seconds, replicas=args.replicas, threads=args.threads)
            r["served_over_raw"] = round(r["images_per_s"] / raw, 3)
            rows.append(r)
            print(f"served  log={'on ' if log else 'off'} prada={'on ' if prada else 'off'}: "
                  f"{r['images_per_s']:>8,.0f} images/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
                  f"served/raw {r['served_over_raw']:.2f}", flush=True)
    ray.shutdown()

    def overhead(prada):
        on = next(r for r in rows if r["log"] and r["prada"] == prada)["images_per_s"]
        off = next(r for r in rows if not r["log"] and r["prada"] == prada)["images_per_s"]
        return round(1 - on / off, 3)

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__},
        "victim": {"arch": victim.arch, "dataset": cfg.victim.dataset},
        "clients": args.clients, "batch": args.batch, "seconds_per_config": args.seconds,
        "replicas": args.replicas, "threads_per_replica": args.threads,
        "raw_images_per_s": round(raw, 1), "served": rows,
        "log_overhead": {"prada_off": overhead(False), "prada_on": overhead(True)},
    }
    print(f"log overhead: {result['log_overhead']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(table(result))
    print(f"written to {args.out}")


def table(result: dict) -> str:
    """The results as Markdown: raw against served, with the query log and PRADA on and off."""
    lines = [f"{result['clients']} client actors sending batches of {result['batch']} through DeploymentHandles to "
             f"{result['replicas']} Serve replica(s) ({result['threads_per_replica']} torch thread each), "
             f"{result['seconds_per_config']:g} s per configuration, on {result['machine']['cpus']} CPUs; raw is the "
             f"best of three windows of batched forward passes in one process on all cores.", "",
             "| configuration | images/s | p50 ms | p99 ms | served ÷ raw |", "|---|---:|---:|---:|---:|",
             f"| raw forward pass | {result['raw_images_per_s']:,.0f} | | | 1 |"]
    for r in result["served"]:
        lines.append(f"| served, log {'on' if r['log'] else 'off'}, PRADA {'on' if r['prada'] else 'off'} | "
                     f"{r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['served_over_raw']:.2f} |")
    o = result["log_overhead"]
    lines += ["", f"The query log's cost: {o['prada_off']:.0%} of served throughput with PRADA off, "
                  f"{o['prada_on']:.0%} with it on."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
