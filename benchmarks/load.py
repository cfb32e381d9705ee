"""A long load run against the served victim over HTTP: the request rate it holds, errors, latency percentiles and the
memory of its replicas and detection-tier shards over time.

    python benchmarks/load.py [--minutes 5] [--clients 16] [--rate R] [--batch 16] [--replicas 2]
                              [--encoding base64|json|npy] [--no-prada] [--window 15] [--out FILE.json]
                              [--report-only]

The victim is the `distributed_knockoff` scenario's (LeNet on mnist5k, from the zoo's cache; trained first if not
there), behind PRADA per account (unless --no-prada) with the query log on, deployed with this tool's defaults on a
local Ray. --clients threads each send --batch test images per request from an account of their own, over HTTP in
--encoding. With --rate (requests per second, all clients together) the clients are paced (open loop) and the run
shows whether the service holds that rate; without it they send as fast as answers come (closed loop). Every
--window seconds the run records requests answered, errors by kind, p50/p95/p99 latency over the window, and the
resident memory of each replica and shard (read from /proc: a local run). At the end it checks the query log: every
answered query in it exactly once. Results are printed and written as JSON and as Markdown beside it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter

import numpy as np
import ray
from serving import encode  # benchmarks/serving.py: request bodies in each encoding

from sim.cli import OneLineParser, count, description, machine, output_file, positive, read_results, script


def rss_mb(pid: int) -> float | None:
    """Resident memory of a local process in MiB (Linux /proc), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def app_processes(app: str) -> dict[str, int]:
    """The live actors of the app's replicas and detection tier: label ("replica 0", "shard 1", ...) -> process id."""
    out: dict[str, int] = {}
    for info in sorted(ray._private.state.actors().values(), key=lambda i: i["Name"]):
        if info["State"] == "ALIVE" and app in info["Name"]:
            cls = info["ActorClassName"]
            kind = "replica" if "ServeReplica" in cls else cls.removesuffix("Actor").lower()
            out[f"{kind} {sum(label.startswith(kind) for label in out)}"] = info["Pid"]
    return out


class Recorder:
    """Every request's end time, latency and outcome, from all client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[tuple[float, float, str, int]] = []  # (end, seconds, outcome, queries answered)

    def add(self, end: float, seconds: float, outcome: str, answered: int) -> None:
        with self.lock:
            self.rows.append((end, seconds, outcome, answered))

    def between(self, t0: float, t1: float) -> list[tuple]:
        with self.lock:
            return [r for r in self.rows if t0 <= r[0] < t1]


def client(port: int, app: str, key: str, bodies: list[bytes], ctype: str, stop: float, interval: float | None,
           rec: Recorder) -> None:
    """One account's client: POST until ``stop``, every ``interval`` seconds (paced) or back to back."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i, due = 0, time.perf_counter()
    while time.perf_counter() < stop:
        if interval is not None:
            due += interval
            time.sleep(max(0.0, due - time.perf_counter()))
        t = time.perf_counter()
        try:
            conn.request("POST", f"/{app}", body=bodies[i % len(bodies)], headers={"Content-Type": ctype,
                                                                                   "X-API-Key": key})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                answer = json.loads(body)
                actions = answer["actions"] if "actions" in answer else [r["action"] for r in answer["results"]]
                n = actions.count("answered")
                rec.add(time.perf_counter(), time.perf_counter() - t, "ok", n)
            else:
                rec.add(time.perf_counter(), time.perf_counter() - t, f"HTTP {resp.status}", 0)
        except (OSError, http.client.HTTPException) as exc:
            rec.add(time.perf_counter(), time.perf_counter() - t, type(exc).__name__, 0)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i += 1


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p = np.percentile(np.asarray(seconds) * 1e3, [50, 95, 99])
    return {"p50_ms": round(float(p[0]), 1), "p95_ms": round(float(p[1]), 1), "p99_ms": round(float(p[2]), 1)}


def run(args) -> dict:
    """The load run, its query log and tier state in a temporary directory removed however it ends."""
    tmp = tempfile.mkdtemp(prefix="load-")
    try:
        return _measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, tmp: str) -> dict:
    from ray import serve

    from sim import config, querylog, zoo
    from sim.engine import init_local_ray
    from sim.protocol import Account
    from sim.serving import VictimSpec, delete, deploy, free_port

    cfg = config.load("distributed_knockoff")
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    init_local_ray(num_cpus=os.cpu_count())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    keys = {f"key-{i}": Account(f"acct-{i}", "attacker", "load", f"cohort-{i % 2}") for i in range(args.clients)}
    log_dir = os.path.join(tmp, "queries")
    spec = VictimSpec(victim="load", run_id="load", input_shape=victim.dataset.input_shape, accounts=keys,
                      model=victim.to_bytes(), rules={}, defense={"name": "identity"},
                      detectors={"prada": {"kind": "prada", "params": {"delta": 0.95, "min_pool": 50}}}
                      if args.prada else {}, log_dir=log_dir, log_inputs=True, max_images=max(256, args.batch),
                      shards=args.replicas, state_dir=os.path.join(tmp, "tier"))
    app = "loadbench"
    deploy(spec, app, replicas=args.replicas, replica_cpus=min(1.0, (os.cpu_count() or 2) / args.replicas / 2),
           max_queued_requests=cfg.serve.max_queued_requests)
    bodies, ctype = encode(victim.dataset.x_test, args.encoding, args.batch)
    rec = Recorder()
    start = time.perf_counter()
    stop = start + args.minutes * 60
    interval = args.clients / args.rate if args.rate else None
    threads = [threading.Thread(target=client, args=(port, app, key, bodies, ctype, stop, interval, rec), daemon=True)
               for key in keys]
    for t in threads:
        t.start()
    windows, procs = [], app_processes(app)
    memory0 = {label: rss_mb(pid) for label, pid in procs.items()}
    t0 = start
    while t0 < stop:
        time.sleep(max(0.0, min(t0 + args.window, stop) - time.perf_counter()))
        t1 = time.perf_counter()
        rows = rec.between(t0, t1)
        ok = [r for r in rows if r[2] == "ok"]
        window = {"t_s": round(t1 - start, 1), "requests_per_s": round(len(ok) / (t1 - t0), 2),
                  "queries_per_s": round(sum(r[3] for r in ok) / (t1 - t0), 1),
                  "errors": dict(Counter(r[2] for r in rows if r[2] != "ok")), **percentiles([r[1] for r in ok]),
                  "memory_mb": {label: round(m, 1) for label, pid in procs.items()
                                if (m := rss_mb(pid)) is not None}}
        windows.append(window)
        print(f"{window['t_s']:7.1f} s  {window['requests_per_s']:6.1f} req/s  p50 {window['p50_ms']} ms  "
              f"p99 {window['p99_ms']} ms  errors {window['errors'] or 0}  memory "
              + ", ".join(f"{k} {v:.0f}" for k, v in window["memory_mb"].items()) + " MiB", flush=True)
        t0 = t1
    for t in threads:
        t.join(120)
    delete(spec, app)
    ok = [r for r in rec.rows if r[2] == "ok"]
    # the rate over the run itself: until the last answer came (the requests in flight at the stop), not the wind-down
    elapsed = max([stop, *(r[0] for r in ok)]) - start
    table = querylog.read(log_dir, columns=["request_id", "action"])
    answered = querylog.ANSWERED
    logged = sum(a in answered for a in table.column("action").to_pylist())
    per_request = Counter(table.column("request_id").to_pylist())
    memory1 = windows[-1]["memory_mb"] if windows else {}
    return {
        "machine": machine(), "measured": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {"minutes": args.minutes, "clients": args.clients, "rate": args.rate, "batch": args.batch,
                     "replicas": args.replicas, "encoding": args.encoding, "prada": args.prada},
        "requests": len(rec.rows), "answered_requests": len(ok), "seconds": round(elapsed, 1),
        "requests_per_s": round(len(ok) / elapsed, 2), "queries_per_s": round(sum(r[3] for r in ok) / elapsed, 1),
        "errors": dict(Counter(r[2] for r in rec.rows if r[2] != "ok")), **percentiles([r[1] for r in ok]),
        "answered_queries": sum(r[3] for r in ok), "logged_answered_queries": logged,
        "logged_once": logged == sum(r[3] for r in ok) and set(per_request.values()) <= {args.batch},
        "memory_mb": {label: {"start": memory0.get(label) and round(memory0[label], 1), "end": memory1.get(label)}
                      for label in procs},
        "windows": windows,
    }


def report(r: dict) -> str:
    s = r["settings"]
    pace = f"paced at {s['rate']} requests/s in all" if s["rate"] else "closed loop (each client sends on an answer)"
    lines = [
        "# Load run", "",
        f"Written by `python benchmarks/load.py` ({r['measured']}, {r['machine']}): {s['clients']} HTTP clients, "
        f"each on its own account, {s['batch']} images per request in {s['encoding']}, {pace}, for {s['minutes']} "
        f"minutes, against {s['replicas']} replicas with {'PRADA per account and ' if s['prada'] else ''}the query "
        f"log on.", "",
        f"- {r['answered_requests']:,} of {r['requests']:,} requests answered in {r['seconds']} s: "
        f"{r['requests_per_s']} requests/s, {r['queries_per_s']} queries/s",
        f"- errors: {r['errors'] or 'none'}",
        f"- latency: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms",
        f"- query log: {r['logged_answered_queries']:,} answered rows for {r['answered_queries']:,} answered queries; "
        f"every answered query logged exactly once: {'yes' if r['logged_once'] else 'NO'}",
        "- resident memory (MiB), when the load started and when it ended: " + ", ".join(
            f"{k} {v['start']} -> {v['end']}" for k, v in r["memory_mb"].items()), "",
        "| t (s) | requests/s | queries/s | p50 ms | p95 ms | p99 ms | errors | memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in r["windows"]:
        mem = ", ".join(f"{k} {v:.0f}" for k, v in w["memory_mb"].items())
        lines.append(f"| {w['t_s']} | {w['requests_per_s']} | {w['queries_per_s']} | {w['p50_ms']} | {w['p95_ms']} | "
                     f"{w['p99_ms']} | {sum(w['errors'].values()) if w['errors'] else 0} | {mem} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = OneLineParser(prog="python benchmarks/load.py", description=description(__doc__))
    ap.add_argument("--minutes", type=positive, default=5.0)
    ap.add_argument("--clients", type=count, default=16)
    ap.add_argument("--rate", type=positive, default=None, help="requests per second, all clients together (paced)")
    ap.add_argument("--batch", type=count, default=16)
    ap.add_argument("--replicas", type=count, default=2)
    ap.add_argument("--encoding", choices=("base64", "json", "npy"), default="base64")
    ap.add_argument("--no-prada", dest="prada", action="store_false")
    ap.add_argument("--window", type=positive, default=15.0, help="seconds per row of the time series")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "load.json"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from --out's JSON")
    args = ap.parse_args()
    md = os.path.splitext(args.out)[0] + ".md"
    if args.report_only:
        text = report(read_results(args.out, ("settings", "measured", "machine", "windows"), "benchmarks/load.py"))
        with open(md, "w") as fh:  # opened once the text is made: a JSON that is not a load run leaves it as it was
            fh.write(text)
        return
    args.out = output_file(args.out)
    for name in ("minutes", "clients", "batch", "replicas", "window"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name}={getattr(args, name)}: expected a positive number")
    if args.rate is not None and args.rate <= 0:
        ap.error(f"--rate={args.rate}: expected a positive number of requests per second")
    result = run(args)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    with open(md, "w") as fh:
        fh.write(report(result))
    print(report(result))
    print(f"-> {args.out}, {md}")
    ray.shutdown()


if __name__ == "__main__":
    script(main)
