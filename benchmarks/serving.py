"""Serving throughput of the defended victim: raw forward pass, Ray Serve with the full pipeline and the detection
tier, the HTTP encodings, scaling over replicas and shards, and PRADA's cost per query and per account.

    python benchmarks/serving.py [--seconds 10] [--rounds 3] [--only pipeline,http,...] [--out FILE.json]

Sections, each measured in this one run on this machine (``--only`` runs some and keeps the others' last results):
  - pipeline: --clients actors sending batches of --batch images through DeploymentHandles to --replicas replicas,
    for (query log on/off) x (PRADA on/off) with one account per client, and PRADA on with 8 and 64 accounts per client
    (shorter histories), taking turns --rounds times: images/s, p50/p99 request latency, served / raw; PRADA's cost
    is served(PRADA on) / served(PRADA off), both with the log on;
  - http: 16 clients x 64 images per request, over HTTP with JSON floats, base64 uint8 and .npy bodies, beside the
    handle path at the same load (bodies are encoded once beforehand: what is measured is the service's side);
  - scaling: 1, 2 and 4 replicas x 1 and 2 shards with PRADA and linking on, on a local two-node cluster
    (ray.cluster_utils.Cluster, 1 CPU per node): images/s, p50/p99, per-replica efficiency;
  - prada: PRADA alone (no Ray), 10 to 10,000 accounts: microseconds per query and bytes per account and per kept
    query;
  - linking: the scenario sybil_vs_prada on 2 replicas and 2 shards: how many queries after the data they judge
    account linking's flags reached the shards (each newly flagged account's queries in between);
  - tier: one request's trip through the detection tier (--batch images to a PRADA shard actor, one at a time, the
    machine otherwise idle) beside the same requests scored by the shard in this process, for 64 accounts in turn
    (short histories) and for one account whose history grows, with the CPU each request costs the calling process,
    the shard's process and PRADA in process; and the whole service in this process on one core, PRADA off and on:
    PRADA's cost without the hop;
  - device: ResNet-18 on 32x32 RGB inputs on the CPU and, where one is visible, on a GPU: raw forward, served (handle
    path, log on), training images/s, and MAD's cost per query with a ResNet-18 surrogate (and, on a GPU, how far its
    answers are from the CPU's).
Results are printed and written as JSON and as Markdown beside it (``--report-only`` rewrites the Markdown).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import ray
import torch

from sim.cli import OneLineParser, count, description, output_file, positive, read_results, script

MORE_ACCOUNTS = (8, 64)  # accounts per client in the pipeline's PRADA rows beyond one (shorter histories each)
SECTIONS = ("pipeline", "http", "scaling", "prada", "linking", "device", "tier")
TIMED = ("pipeline", "http", "scaling", "device")  # the sections that measure for --seconds per configuration
PRADA = {"kind": "prada", "params": {"delta": 0.95, "min_pool": 50}}
LINK = {"kind": "link", "params": {}}


@ray.remote(num_cpus=0)
class BenchClient:
    """Sends batches for ``seconds``, through the app's handle, or over HTTP with ``bodies`` (pre-encoded)."""

    def __init__(self, app: str, keys: list[str], images: np.ndarray, port: int | None = None, bodies=None,
                 content_type: str = "application/json"):
        from ray import serve

        torch.set_num_threads(1)
        self.keys, self.images, self.app, self.port = keys, images, app, port
        self.bodies, self.content_type = bodies, content_type
        self.handle = serve.get_deployment_handle("victim", app) if bodies is None else None

    def _send(self, i: int, batch: int, rng) -> int:
        key = self.keys[i % len(self.keys)]  # its accounts in turn
        if self.bodies is None:
            idx = rng.integers(0, len(self.images), batch)
            return len(self.handle.query.remote(key, self.images[idx]).result().answered)
        self.conn.request("POST", f"/{self.app}", body=self.bodies[i % len(self.bodies)],
                          headers={"Content-Type": self.content_type, "X-API-Key": key})
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
        answer = json.loads(body)
        return len(answer["actions"] if "actions" in answer else answer["results"])  # compact answers / JSON

    def warm(self, batch: int) -> None:
        """One request, once this client is up (its imports done, its connection open): measuring starts only when
        every client is warm, so no client's start-up takes CPU from the others' measured window."""
        if self.bodies is not None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        self._send(0, batch, np.random.default_rng(1))

    def run(self, seconds: float, batch: int) -> dict:
        rng = np.random.default_rng(0)
        lat, n, i = [], 0, 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            n += self._send(i, batch, rng)
            lat.append(time.perf_counter() - t)
            i += 1
        return {"images": n, "seconds": time.perf_counter() - start, "latencies": lat}


def raw_throughput(model, images: np.ndarray, batch: int, seconds: float, device: str = "cpu") -> float:
    """Best of three windows (the machine is noisy; the best is the conservative denominator)."""
    return max(_raw_window(model, images, batch, seconds / 3, device) for _ in range(3))


def _raw_window(model, images: np.ndarray, batch: int, seconds: float, device: str = "cpu") -> float:
    from sim.training import to_float

    torch.set_num_threads(os.cpu_count() or 1)
    model.eval()
    x = to_float(images[:batch]).to(device)
    with torch.inference_mode():
        for _ in range(5):
            torch.softmax(model(x), 1).cpu()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.softmax(model(x), 1).cpu()  # the answers back on the host, as a server needs them
            n += batch
    return n / (time.perf_counter() - start)


def encode(images: np.ndarray, encoding: str, batch: int, count: int = 8) -> tuple[list[bytes], str]:
    """``count`` request bodies of ``batch`` random test images in ``encoding``, and their content type."""
    rng = np.random.default_rng(1)
    bodies = []
    for _ in range(count):
        x = images[rng.integers(0, len(images), batch)]
        if encoding == "json":
            bodies.append(json.dumps({"images": (x / 255.0).round(4).tolist()}).encode())
        elif encoding == "base64":
            bodies.append(json.dumps({"uint8": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape)})
                          .encode())
        else:
            buf = io.BytesIO()
            np.save(buf, x)
            bodies.append(buf.getvalue())
    return bodies, "application/x-npy" if encoding == "npy" else "application/json"


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:9]]  # user .. steal (guest time is in user)
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), sum(ticks)  # less idle and I/O wait


# the processes whose CPU time the pipeline reports apart (a substring of their command line); the rest is Ray's own
# processes (raylet, GCS, the Serve controller and proxy) and the driver: this benchmark's processes only
PROCESS_GROUPS = {"replicas": "ServeReplica", "shards": "ShardActor", "linkers": "LinkerActor",
                  "clients": "BenchClient"}


def _process_ticks() -> dict[int, tuple[str, int]]:
    """The CPU time so far (clock ticks, user + system) and group of this process and its descendants: the local Ray
    this benchmark started and everything in it, not another session's processes ({} where there is no /proc)."""
    stats: dict[int, tuple[int, str, int]] = {}  # pid -> (parent, group, ticks)
    if not os.path.isdir("/proc"):
        return {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        group = next((g for g, mark in PROCESS_GROUPS.items() if mark in cmd), "Ray and the rest")
        stats[int(pid)] = (int(fields[1]), group, int(fields[11]) + int(fields[12]))
    ours, grew = {os.getpid()}, True
    while grew:  # the descendants of this process
        more = {pid for pid, (parent, _, _) in stats.items() if parent in ours} - ours
        ours |= more
        grew = bool(more)
    return {pid: (group, ticks) for pid, (_, group, ticks) in stats.items() if pid in ours}


def _cpu_by_group(before: dict, after: dict, images: int) -> dict[str, float]:
    """CPU microseconds per image served, per group of processes, between two :func:`_process_ticks`."""
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for pid, (group, ticks) in after.items():
        used[group] = used.get(group, 0.0) + (ticks - before.get(pid, (group, 0))[1]) * tick_us
    return {g: round(us / max(images, 1), 1) for g, us in used.items() if us > 0}


def served(victim, images, *, log: bool, detectors: dict, clients: int, batch: int, seconds: float,
           replicas: int = 1, shards: int | None = None, threads: int = 1, encoding: str | None = None,
           port: int | None = None, replica_cpus: float | None = None, device: str = "cpu",
           replica_gpus: float = 0.0, accounts: int = 1, defense: dict | None = None,
           defense_models: dict | None = None) -> dict:
    """Deploy the victim (a zoo victim, or ``(model bytes, input shape)``) with ``detectors`` and ``defense``
    (default: none; ``defense_models`` as :func:`sim.defenses.prepare` gives them) and measure ``clients`` clients
    (``encoding``: over HTTP, else handles), each sending from ``accounts`` accounts in turn."""
    from sim.protocol import Account
    from sim.serving import VictimSpec, delete, deploy

    keys = {f"key-{i}-{j}": Account(f"acct-{i}-{j}", "attacker", "bench", f"cohort-{i % 2}")
            for i in range(clients) for j in range(accounts)}
    tmp = tempfile.mkdtemp(prefix="bench-log-")
    model, shape = victim if isinstance(victim, tuple) else (victim.to_bytes(), victim.dataset.input_shape)
    spec = VictimSpec(victim="bench", run_id="bench", input_shape=shape, accounts=keys,
                      model=model, detectors=detectors, rules={}, defense=defense or {"name": "identity"},
                      defense_models=defense_models or {},
                      log_dir=tmp if log else None, log_inputs=True, max_images=max(256, batch), threads=threads,
                      shards=shards or replicas, state_dir=os.path.join(tmp, "tier"), device=device)
    app = f"bench-{int(time.time() * 1000) % 10**8}"
    deploy(spec, app, replicas=replicas, replica_cpus=replica_cpus or 1 / replicas, max_ongoing_requests=128,
           replica_gpus=replica_gpus)
    bodies, ctype = encode(images, encoding, batch) if encoding else (None, "application/json")
    actors = [BenchClient.remote(app, [f"key-{i}-{j}" for j in range(accounts)], images, port, bodies, ctype)
              for i in range(clients)]
    try:
        ray.get([a.warm.remote(batch) for a in actors])
        before, procs = _cpu_jiffies(), _process_ticks()
        out = ray.get([a.run.remote(seconds, batch) for a in actors])
        after, procs_after = _cpu_jiffies(), _process_ticks()
    finally:
        delete(spec, app)
        for a in actors:
            ray.kill(a)
        shutil.rmtree(tmp, ignore_errors=True)  # the configuration's query log and tier state
    total = sum(o["images"] for o in out)
    secs = max(o["seconds"] for o in out)
    lat = np.concatenate([o["latencies"] for o in out]) * 1e3
    busy = round((after[0] - before[0]) / (after[1] - before[1]), 3) if before and after else None
    return {"images_per_s": round(total / secs, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "requests": int(len(lat)),
            "busy": busy,  # the machine's share of CPU time in use while the clients ran, theirs included
            "cpu_us_per_image": _cpu_by_group(procs, procs_after, total)}


def _line(label: str, r: dict, ref: float | None = None, what: str = "served/raw") -> None:
    extra = f"  {what} {r['images_per_s'] / ref:.2f}" if ref else ""
    print(f"{label:<44}{r['images_per_s']:>9,.0f} images/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
          f"{extra}", flush=True)


def pipeline(victim, images, raw: float, args) -> dict:
    """Log and PRADA on and off with one account per client; then PRADA on with each of ``MORE_ACCOUNTS`` accounts
    per client, whose histories stay shorter (PRADA's work per query grows with its account's history). The
    configurations take turns, ``--rounds`` times, so that a machine whose speed drifts affects them alike: each
    figure is the median over rounds, and each ratio the median of the rounds' own ratios (with its range)."""
    configs = ((False, False, 1), (False, True, 1), (True, False, 1), (True, True, 1),
               *((True, True, n) for n in MORE_ACCOUNTS))
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for prada, log, accounts in configs:
            r = served(victim, images, log=log, detectors={"prada": PRADA} if prada else {}, clients=args.clients,
                       batch=args.batch, seconds=args.seconds, replicas=args.replicas, threads=args.threads,
                       accounts=accounts)
            runs[(prada, log, accounts)].append(r)
            _line(f"round {round_ + 1}: log={'on' if log else 'off'} prada={'on' if prada else 'off'} "
                  f"accounts={accounts}", r, raw)
    rows = []
    for (prada, log, accounts), rs in runs.items():
        row = {k: round(float(np.median([r[k] for r in rs])), 2) for k in ("images_per_s", "p50_ms", "p99_ms")}
        if all(r.get("busy") is not None for r in rs):
            row["busy"] = round(float(np.median([r["busy"] for r in rs])), 3)
        groups = sorted({g for r in rs for g in r.get("cpu_us_per_image", {})})
        if groups:
            row["cpu_us_per_image"] = {g: round(float(np.median([r["cpu_us_per_image"].get(g, 0.0) for r in rs])), 1)
                                       for g in groups}
        row.update(log=log, prada=prada, accounts=accounts, requests=sum(r["requests"] for r in rs),
                   served_over_raw=round(row["images_per_s"] / raw, 3))
        rows.append(row)

    def ratio(num, den) -> dict:
        per_round = [n["images_per_s"] / d["images_per_s"] for n, d in zip(runs[num], runs[den])]
        return {"median": round(float(np.median(per_round)), 3), "min": round(min(per_round), 3),
                "max": round(max(per_round), 3)}

    out = {"clients": args.clients, "batch": args.batch, "replicas": args.replicas, "threads": args.threads,
           "rounds": args.rounds, "rows": rows,
           "prada_cost": ratio((True, True, 1), (False, True, 1)),
           "prada_cost_by_accounts": {str(n): ratio((True, True, n), (False, True, 1)) for n in MORE_ACCOUNTS},
           "log_cost": ratio((False, True, 1), (False, False, 1))}
    print(f"PRADA's cost (on / off, log on): {out['prada_cost']}; by accounts per client: "
          f"{out['prada_cost_by_accounts']}; the log's (on / off): {out['log_cost']}", flush=True)
    return out


def http_section(victim, images, port: int, args) -> dict:
    rows = []
    for encoding in (None, "json", "base64", "npy"):
        r = served(victim, images, log=True, detectors={}, clients=16, batch=64, seconds=args.seconds,
                   replicas=args.replicas, encoding=encoding, port=port)
        r["encoding"] = encoding or "handle"
        rows.append(r)
        _line(f"16 clients x 64 images, {r['encoding']}", r, rows[0]["images_per_s"], "of handle")
    for r in rows:
        r["of_handle"] = round(r["images_per_s"] / rows[0]["images_per_s"], 3)
    return {"clients": 16, "batch": 64, "replicas": args.replicas, "rows": rows}


def scaling(victim, images, args) -> dict:
    """Replicas x shards on a local two-node cluster (the driver joins it)."""
    from ray import serve
    from ray.cluster_utils import Cluster

    from sim.serving import forget_serve

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    rows = []
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        serve.start(http_options={"location": "NoServer"})
        for replicas in (1, 2, 4):
            for shards in (1, 2):
                r = served(victim, images, log=True, detectors={"prada": PRADA, "link": LINK}, clients=8,
                           batch=args.batch, seconds=args.seconds, replicas=replicas, shards=shards,
                           replica_cpus=0.5)
                r.update(replicas=replicas, shards=shards)
                rows.append(r)
                _line(f"cluster: {replicas} replica{'s' * (replicas != 1)}, {shards} shard{'s' * (shards != 1)}", r)
        base = rows[0]["images_per_s"]
        for r in rows:
            r["per_replica_efficiency"] = round(r["images_per_s"] / (base * r["replicas"]), 3)
    finally:
        forget_serve()
        ray.shutdown()
        cluster.shutdown()
    return {"nodes": 2, "cpus_per_node": 1, "clients": 8, "batch": args.batch, "rows": rows}


def prada_scale(images: np.ndarray, per_account: int = 60) -> dict:
    """PRADA alone: time per query and memory, as the number of accounts grows (``per_account`` queries each,
    sent 8 at a time, accounts interleaved). Memory twice: PRADA's buffers as allocated (its ``memory()``), and all
    that building the state allocated, Python's objects included (tracemalloc, in a second, untimed pass over the same
    queries), which is what a shard's process holds for it."""
    import tracemalloc

    from sim.detectors import build

    def feed(accounts: int, clock: bool):
        rng = np.random.default_rng(accounts)
        labels = rng.integers(0, 10, len(images))
        det, n, t = build("prada", delta=0.95, min_pool=50), 0, 0.0
        for step in range(per_account // 8 + (per_account % 8 > 0)):
            for a in range(accounts):
                idx = rng.integers(0, len(images), 8)
                start = time.perf_counter() if clock else 0.0
                det.score(f"acct-{a}", images[idx], labels[idx])
                t += time.perf_counter() - start if clock else 0.0
                n += 8
        return det, n, t

    rows = []
    for accounts in (10, 100, 1000, 10_000):
        det, n, t = feed(accounts, clock=True)
        mem = det.memory()
        del det
        tracemalloc.start()
        held = feed(accounts, clock=False)[0]  # noqa: F841 (kept alive while the memory is read)
        total = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del held
        rows.append({"accounts": accounts, "queries": n, "us_per_query": round(t / n * 1e6, 1),
                     "bytes_per_account": round(mem["bytes"] / accounts), "kept_per_account": mem["kept"] / accounts,
                     "bytes_per_kept_query": round(mem["bytes"] / max(mem["kept"], 1)),
                     "all_bytes_per_account": round(total / accounts)})
        print(f"prada {accounts:>6} accounts: {rows[-1]['us_per_query']:.1f} us/query, "
              f"{rows[-1]['bytes_per_account']:,} bytes/account in buffers, "
              f"{rows[-1]['all_bytes_per_account']:,} all told", flush=True)
    return {"queries_per_account": per_account, "rows": rows, "pixels": int(np.prod(images.shape[1:]))}


def device_section(args) -> dict:
    """ResNet-18 on 32x32 RGB inputs (random pixels: the cost does not depend on them) on each device there is."""
    from sim import defenses, models
    from sim.training import TRAINING_THREADS, predict_probs, train_classifier

    shape, rng = (3, 32, 32), np.random.default_rng(0)
    images = rng.integers(0, 256, (4096, *shape), dtype=np.uint8)
    rows, mad_cpu = [], None
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        torch.manual_seed(0)
        model = models.build("resnet18", shape, 10)
        raw = raw_throughput(model.to(device), images, args.batch, args.seconds, device)
        r = served((models.to_bytes(model.cpu(), "resnet18", shape, 10), shape), images, log=True, detectors={},
                   clients=args.clients, batch=args.batch, seconds=args.seconds, replicas=args.replicas,
                   device=device, replica_gpus=(1 / args.replicas) if device == "cuda" else 0.0)
        net = models.build("resnet18", shape, 10).to(device)
        start = time.perf_counter()
        train_classifier(net, images[:2048], rng.integers(0, 10, 2048), epochs=1, batch_size=128)
        if device == "cuda":
            torch.cuda.synchronize()
        train = 2048 / (time.perf_counter() - start)
        mad = defenses.build("mad", eps=0.5, victim=models.build("resnet18", shape, 10)).to(device)
        clean = predict_probs(model.cpu(), images[:256])
        start = time.perf_counter()
        answers = mad(clean, images[:256])
        mad_us = (time.perf_counter() - start) / 256 * 1e6
        if device == "cpu":
            mad_cpu = answers
        rows.append({"device": device, "raw_images_per_s": round(raw, 1), "served": r,
                     "served_over_raw": round(r["images_per_s"] / raw, 3), "train_images_per_s": round(train, 1),
                     "train_threads": TRAINING_THREADS if device == "cpu" else None,
                     "mad_us_per_query": round(mad_us, 1),
                     "mad_max_diff_from_cpu": None if device == "cpu" else float(np.abs(answers - mad_cpu).max())})
        print(f"{device}: raw {raw:,.0f} images/s, served {r['images_per_s']:,.0f}, training {train:,.0f} images/s, "
              f"MAD {mad_us:,.0f} us/query", flush=True)
    return {"model": "resnet18", "input": list(shape), "clients": args.clients, "batch": args.batch,
            "replicas": args.replicas, "rows": rows}


def tier_hop(victim, images: np.ndarray, batch: int, requests: int = 300) -> dict:
    """Milliseconds per request: through a shard actor (Ray) and in-process, the same request sequence."""
    from types import SimpleNamespace

    from threadpoolctl import threadpool_limits

    from sim import detectors, tier, tier_actors

    rng = np.random.default_rng(0)
    probs = np.full((batch, 10), 0.1, np.float32)
    rows = []
    for label, keys in (("64 accounts in turn", [f"acct-{i}" for i in range(64)]), ("one account", ["one"])):
        reqs = [(f"r{i}", [("prada", keys[i % len(keys)])], images[rng.integers(0, len(images), batch)],
                 rng.integers(0, 10, batch), probs) for i in range(requests)]
        spec = SimpleNamespace(detectors={"prada": PRADA}, rules={}, shards=1,
                               state_dir=None, detector_models={}, runtime_env=None)
        app = f"hop-{len(keys)}"
        shard_pid = ray.get(tier_actors.start(spec, app))[0]["pid"]
        remote = tier_actors.RayTier(app, 1)
        hop = []

        def shard_ticks() -> int | None:  # the shard process's CPU so far (None where there is no /proc)
            return _process_ticks().get(shard_pid, (None, None))[1]

        ticks = shard_ticks()  # before the caller's clock starts: reading /proc is not the call's cost
        cpu = time.process_time()
        for req in reqs:
            start = time.perf_counter()
            remote.score(*req)
            hop.append(time.perf_counter() - start)
        caller_ms = (time.process_time() - cpu) / requests * 1e3  # this process's threads, Ray's own included
        after = shard_ticks()
        shard_ms = (None if ticks is None or after is None
                    else round((after - ticks) * 1e3 / os.sysconf("SC_CLK_TCK") / requests, 2))
        tier_actors.stop(app)
        local = tier.Shard({"prada": detectors.build("prada", **PRADA["params"])})
        inproc = []
        cpu = time.process_time()
        with threadpool_limits(1):  # one thread for numpy's products, as in a Ray worker (OMP_NUM_THREADS=1)
            for req in reqs:
                start = time.perf_counter()
                local.score(*req)
                inproc.append(time.perf_counter() - start)
        rows.append({"histories": label, "requests": requests, "hop_p50_ms": round(float(np.median(hop)) * 1e3, 2),
                     "in_process_p50_ms": round(float(np.median(inproc)) * 1e3, 2),
                     "caller_cpu_ms": round(caller_ms, 2), "shard_cpu_ms": shard_ms,
                     "in_process_cpu_ms": round((time.process_time() - cpu) / requests * 1e3, 2),
                     "queries_per_key": requests * batch // len(keys)})
        print(f"tier, {label}: {rows[-1]}", flush=True)
    return {"batch": batch, "rows": rows, "service": service_in_process(victim, images, batch)}


def service_in_process(victim, images: np.ndarray, batch: int, clients: int = 8, requests: int = 400,
                       rounds: int = 2) -> dict:
    """The whole service (model, detectors, log) in this process on one core, PRADA off and on, the same request
    stream (``clients`` accounts in turn, one per client as in the pipeline): CPU milliseconds per request. Their
    ratio is PRADA's cost without the tier's hop, what the pipeline's ratio would be if Ray's calls were free."""
    from threadpoolctl import threadpool_limits

    from sim.protocol import Account
    from sim.service import VictimSpec, build_service

    rng = np.random.default_rng(1)
    reqs = [images[rng.integers(0, len(images), batch)] for _ in range(requests)]
    keys = {f"key-{i}": Account(f"acct-{i}", "attacker", "bench", f"cohort-{i % 2}") for i in range(clients)}
    ms: dict[bool, list[float]] = {False: [], True: []}
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):  # one core, as a Ray worker has (OMP_NUM_THREADS=1)
            for _ in range(rounds):
                for prada in (False, True):
                    tmp = tempfile.mkdtemp(prefix="bench-log-")
                    spec = VictimSpec(victim="bench", run_id="bench", input_shape=victim.dataset.input_shape,
                                      accounts=keys, model=victim.to_bytes(),
                                      detectors={"prada": PRADA} if prada else {}, rules={},
                                      defense={"name": "identity"}, log_dir=tmp,
                                      log_inputs=True, max_images=max(256, batch), threads=1, shards=1)
                    service = build_service(spec, "bench")
                    start = time.process_time()
                    for i, x in enumerate(reqs):
                        service.query(f"key-{i % clients}", x)
                    ms[prada].append((time.process_time() - start) / requests * 1e3)
                    service.writer.close()
                    shutil.rmtree(tmp, ignore_errors=True)
    finally:
        torch.set_num_threads(torch_threads)
    off, on = (float(np.median(ms[k])) for k in (False, True))
    out = {"clients": clients, "requests": requests, "rounds": rounds, "off_ms": round(off, 2), "on_ms": round(on, 2),
           "ratio": round(off / on, 3), "queries_per_key": requests * batch // clients}
    print(f"service in one process: {out}", flush=True)
    return out


def linking() -> dict:
    """Linking's delay in a real run: sybil_vs_prada with 2 replicas (and so 2 shards)."""
    import sim

    with tempfile.TemporaryDirectory(prefix="bench-link-") as tmp:
        s = sim.run("sybil_vs_prada", ["serve.replicas=2", f"run_dir={tmp}/run"], quiet=True)
    lags = [lag for sh in s.serve.tier["per_shard"] for lag in sh.get("link_lags", [])]
    out = {"scenario": "sybil_vs_prada", "replicas": 2, "shards": s.serve.tier["shards"],
           "flagged_by_link": {a.id: a.accounts_flagged_by.get("link", 0) for a in s.attackers},
           "newly_flagged": len(lags), "lag_mean": round(float(np.mean(lags)), 2) if lags else None,
           "lag_max": max(lags) if lags else None, "lag_zero": sum(1 for x in lags if x == 0)}
    print(f"linking: {out}", flush=True)
    return out


def main() -> None:
    ap = OneLineParser(prog="python benchmarks/serving.py", description=description(__doc__))
    ap.add_argument("--seconds", type=positive, default=10.0)
    ap.add_argument("--clients", type=count, default=16,
                    help="closed-loop clients of the pipeline and device sections: enough to keep the cores busy in "
                         "every configuration (with 8, PRADA's requests waiting on their shard left a quarter of the "
                         "machine idle; the pipeline table's 'machine busy' column shows it)")
    ap.add_argument("--rounds", type=count, default=3, help="turns of the pipeline's configurations")
    ap.add_argument("--batch", type=count, default=64)
    ap.add_argument("--replicas", type=count, default=2, help="Serve replicas of the victim")
    ap.add_argument("--threads", type=count, default=1, help="torch threads per replica")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {', '.join(SECTIONS)}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serving.json"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from --out's JSON")
    args = ap.parse_args()
    md = os.path.splitext(args.out)[0] + ".md"
    if args.report_only:
        text = table(read_results(args.out, ("machine", "victim", "seconds_per_config", "raw_images_per_s"),
                                  "benchmarks/serving.py"))
        with open(md, "w") as fh:
            fh.write(text)
        return
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown or not only:
        ap.error(f"--only {','.join(unknown) or repr(args.only)}: expected some of {', '.join(SECTIONS)}")
    args.out = output_file(args.out)
    md = os.path.splitext(args.out)[0] + ".md"
    before = read_results(args.out, ("machine", "victim", "seconds_per_config"), "benchmarks/serving.py") \
        if os.path.exists(args.out) else {}
    result = {k: v for k, v in before.items() if k in SECTIONS}

    from sim import config, zoo
    from sim.serving import forget_serve, free_port

    cfg = config.load("distributed_knockoff")
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    images = victim.dataset.x_test
    raw = raw_throughput(victim.model, images, args.batch, args.seconds)
    print(f"raw forward ({os.cpu_count()} threads, batch {args.batch}): {raw:,.0f} images/s", flush=True)
    if "prada" in only:
        result["prada"] = prada_scale(images)
    if {"pipeline", "http", "device", "tier"} & set(only):
        from ray import serve

        from sim.engine import init_local_ray

        init_local_ray(num_cpus=os.cpu_count())
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if "pipeline" in only:
            result["pipeline"] = pipeline(victim, images, raw, args)
        if "http" in only:
            result["http"] = http_section(victim, images, port, args)
        if "device" in only:
            result["device"] = device_section(args)
        if "tier" in only:
            result["tier"] = tier_hop(victim, images, args.batch)
        forget_serve()  # the next section's Ray is another one
        ray.shutdown()
    if "scaling" in only:
        result["scaling"] = scaling(victim, images, args)
    if "linking" in only:
        result["linking"] = linking()
    for section in only:  # each section remembers when, and how long, it measured (--only keeps the others' results)
        result[section]["date"] = time.strftime("%Y-%m-%d")
        if section in TIMED:
            result[section]["seconds"] = args.seconds
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result.update({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__, "gpu": gpu},
        "victim": {"arch": victim.arch, "dataset": cfg.victim.dataset}, "seconds_per_config": args.seconds,
        "date": time.strftime("%Y-%m-%d"),
        # the pipeline's denominator: measured again only with the pipeline
        "raw_images_per_s": before.get("raw_images_per_s", round(raw, 1)) if "pipeline" not in only else round(raw, 1),
    })
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    with open(md, "w") as fh:
        fh.write(table(result))
    print(f"written to {args.out} and {md}")


def _configuration(row: dict) -> str:
    """A pipeline row's configuration, as its tables name it."""
    many = f", {row['accounts']} accounts per client" if row.get("accounts", 1) > 1 else ""
    return f"log {'on' if row['log'] else 'off'}, PRADA {'on' if row['prada'] else 'off'}{many}"


def cpu_table(rows: list[dict]) -> list[str]:
    """Where the pipeline's CPU time goes: microseconds per image served, per group of processes ([] for results
    measured before the benchmark recorded it)."""
    rows = [r for r in rows if r.get("cpu_us_per_image")]
    if not rows:
        return []
    groups = [g for g in (*PROCESS_GROUPS, "Ray and the rest") if any(g in r["cpu_us_per_image"] for r in rows)]
    lines = ["Where the CPU time goes, in CPU microseconds per image served (from each process's own time in "
             "/proc while the clients ran; medians over the rounds). At 100% busy the images per second are the cores' "
             "time divided by the total, so a configuration's cost is the ratio of its total to another's.", "",
             "| configuration | " + " | ".join(groups) + " | total |", "|---|" + "---:|" * (len(groups) + 1)]
    for r in rows:
        cpu = r["cpu_us_per_image"]
        cells = [f"{cpu.get(g, 0.0):,.0f}" for g in groups] + [f"{sum(cpu.values()):,.0f}"]
        lines.append(f"| {_configuration(r)} | " + " | ".join(cells) + " |")
    return lines + [""] + _fixed_and_own(rows)


SERVICE = ("replicas", "shards", "linkers")  # the service's own processes; the rest is its load and Ray's


def _fixed_and_own(rows: list[dict]) -> list[str]:
    """What the CPU table says of PRADA's cost (log on, one account per client, PRADA off and on): the cores the
    clients and Ray's own processes kept busy, per second, and the ratio the service's own CPU per image predicts."""
    off, on = (next((r for r in rows if r["log"] and r["prada"] is prada and r.get("accounts", 1) == 1
                     and "images_per_s" in r), None) for prada in (False, True))
    if off is None or on is None:
        return []

    def cores(row, *groups) -> float:  # cores kept busy by these groups while the clients ran
        return sum(row["cpu_us_per_image"].get(g, 0.0) for g in groups) * row["images_per_s"] / 1e6

    def own(row) -> float:
        return sum(row["cpu_us_per_image"].get(g, 0.0) for g in SERVICE)

    rest = ("clients", "Ray and the rest")
    busy = (f"log on, one account per client: {cores(off, *rest):.2f} cores with PRADA off, {cores(on, *rest):.2f} "
            f"with it on; the clients alone {cores(off, 'clients'):.2f} and {cores(on, 'clients'):.2f}")
    if abs(cores(on, *rest) - cores(off, *rest)) > 0.15 * cores(off, *rest):
        return [f"The clients and Ray's own processes kept different shares of the cores busy with PRADA off and on "
                f"({busy}), so PRADA's ratio is not the service's own CPU alone.", ""]
    return [f"The clients and Ray's own processes kept about the same share of the cores busy whatever was served "
            f"({busy}): their CPU per image grows as the images per second fall, and is not what PRADA costs. With "
            f"it fixed, PRADA's ratio is the service's own CPU per image (replicas, shards) without PRADA over that "
            f"with it: {own(off):,.0f} ÷ {own(on):,.0f} = **{own(off) / own(on):.2f}**, beside the ratio measured "
            f"in the same rounds above. To raise it is to cut what the replicas and the shards spend per image.", ""]


def table(result: dict) -> str:
    """The results as Markdown, one section per part measured."""
    m = result["machine"]

    def seconds(section: dict) -> float:  # how long it measured each configuration (an untimed section: as the run)
        return section.get("seconds", result["seconds_per_config"])

    def measured(section: dict) -> str:  # a section kept from an earlier run says so, and how long it measured
        when = section.get("date")
        how = f", {seconds(section):g} s per configuration" if seconds(section) != result["seconds_per_config"] else ""
        if when == result.get("date") and not how:
            return ""
        return f" (measured {when}{how})" if when else f" (from an earlier run{how})"

    lines = [f"Measured {result.get('date', '')} on {m['cpus']} CPUs{' and ' + m['gpu'] if m.get('gpu') else ''} "
             f"(torch {m['torch']}, Ray {m['ray']}), {result['victim']['arch']} on {result['victim']['dataset']}, "
             f"{result['seconds_per_config']:g} s per configuration. Raw: the best of three windows of batched forward "
             f"passes in one process on all cores, {result['raw_images_per_s']:,.0f} images/s.", ""]
    p = result.get("pipeline")
    if p:
        lines += ["## The pipeline" + measured(p), "",
                  f"{p['clients']} client actors sending {p['batch']} images per request through DeploymentHandles to "
                  f"{p['replicas']} Serve replicas (1 torch thread each); PRADA's state in the detection tier "
                  f"({p['replicas']} shards). Measuring starts once every client is up and has had one answer.", "",
                  "| configuration | images/s | p50 ms | p99 ms | served ÷ raw | machine busy |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in p["rows"]:
            busy = f"{r['busy']:.0%}" if r.get("busy") is not None else "–"
            lines.append(f"| {_configuration(r)} | {r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['served_over_raw']:.2f} | {busy} |")
        def ratio(r) -> str:
            return f"**{r['median']:.2f}** (rounds: {r['min']:.2f} to {r['max']:.2f})"

        def history(accounts: int) -> float:  # queries per account in a window, PRADA on and the log on
            row = next(r for r in p["rows"] if r["prada"] and r["log"] and r["accounts"] == accounts)
            return row["images_per_s"] * seconds(p) / (p["clients"] * accounts)

        lines += ["", f"Each figure is the median of {p['rounds']} rounds in which the configurations took turns; each "
                      f"ratio is the median of the rounds' own ratios. Machine busy: the share of all cores' time in "
                      f"use while the clients ran (the clients' own included, and any other work on the machine, which "
                      f"would make every figure moot); below 100% the clients were too few to load the service, and a "
                      f"ratio measures latency rather than cost. PRADA's cost, served "
                      f"with PRADA ÷ without, log on: {ratio(p['prada_cost'])} with one account per client, whose "
                      f"history grows to about {history(1):,.0f} queries in a window (once an account holds "
                      f"{PRADA['params']['min_pool']} distances, PRADA runs a Shapiro-Wilk test on its whole pool of "
                      f"them after every query); "
                      + "; ".join(f"{ratio(cost)} with {n} accounts per client in turn, whose histories reach "
                                  f"about {history(int(n)):,.0f} queries each"
                                  for n, cost in p["prada_cost_by_accounts"].items())
                      + f". Where histories hold barely more than {PRADA['params']['min_pool']} queries, few queries "
                        f"are tested at all, and the row measures the tier's hop and PRADA's distances more than its "
                        f"test. The log: served with it ÷ without (PRADA off) {ratio(p['log_cost'])}.", ""]
        lines += cpu_table(p["rows"])
    h = result.get("http")
    if h:
        lines += ["## HTTP encodings" + measured(h), "",
                  f"{h['clients']} clients, {h['batch']} images per request, {h['replicas']} replicas, log on; bodies "
                  f"encoded once beforehand, so this is the service's side of the cost.", "",
                  "| path | images/s | p50 ms | p99 ms | ÷ handle path |", "|---|---:|---:|---:|---:|"]
        for r in h["rows"]:
            lines.append(f"| {r['encoding']} | {r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['of_handle']:.2f} |")
        lines.append("")
    s = result.get("scaling")
    if s:
        lines += ["## Replicas and shards" + measured(s), "",
                  f"A local cluster of {s['nodes']} nodes with {s['cpus_per_node']} CPU each "
                  f"(`ray.cluster_utils.Cluster`) on this machine; PRADA and linking on, log on, {s['clients']} "
                  f"clients x {s['batch']} images per request; replicas reserve 0.5 CPU each. Every node shares the "
                  f"same {m['cpus']} cores, so more replicas cannot add compute here: the table shows what the tier "
                  f"costs and that it stays correct, not how it would scale on separate machines.", "",
                  "| replicas | shards | images/s | p50 ms | p99 ms | per-replica efficiency |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            lines.append(f"| {r['replicas']} | {r['shards']} | {r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['per_replica_efficiency']:.2f} |")
        lines.append("")
    pr = result.get("prada")
    if pr:
        lines += ["## PRADA per query and per account" + measured(pr), "",
                  f"PRADA alone, no Ray: {pr['queries_per_account']} queries per account, 8 per call, accounts "
                  f"interleaved; PRADA's buffers as allocated (they double, so up to twice what is used), and all "
                  f"that building the state allocated, Python's objects included (tracemalloc, an untimed second "
                  f"pass): what a shard's process holds for it.", "",
                  "| accounts | µs per query | bytes per account | kept queries per account | bytes per kept query | "
                  "bytes per account, all told |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in pr["rows"]:
            told = f"{r['all_bytes_per_account']:,}" if "all_bytes_per_account" in r else "-"
            lines.append(f"| {r['accounts']:,} | {r['us_per_query']:.1f} | {r['bytes_per_account']:,} | "
                         f"{r['kept_per_account']:.1f} | {r['bytes_per_kept_query']:,} | {told} |")
        last = pr["rows"][-1]
        per = last.get("all_bytes_per_account", last["bytes_per_account"])
        lines += ["", f"A million accounts of this traffic would hold about {per * 1e6 / 2**30:.1f} GiB of PRADA state"
                      f"{', all told' if 'all_bytes_per_account' in last else ''}, spread over the shards' processes "
                      f"(a process's resident memory also holds what its allocator keeps back).", ""]
    t = result.get("tier")
    if t:
        lines += ["## One request through the detection tier" + measured(t), "",
                  f"{t['batch']} images per request to one PRADA shard, one request at a time on an otherwise idle "
                  f"machine: the time of the call through Ray (`RayTier.score`) and of the same requests scored by a "
                  f"shard in the calling process (PRADA's own work); and the CPU each costs per request: the "
                  f"calling process's (all its threads, Ray's included), the shard actor's process's, and PRADA's "
                  f"own in process. What the two processes spend beyond PRADA's own CPU is the call's cost in Ray.",
                  "", "| histories | queries per key | through the shard actor, p50 ms | in process, p50 ms | caller "
                      "CPU ms | shard CPU ms | in-process CPU ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            lines.append(f"| {r['histories']} | {r['queries_per_key']:,} | {r['hop_p50_ms']:.2f} | "
                         f"{r['in_process_p50_ms']:.2f} | {r['caller_cpu_ms']:.2f} | "
                         f"{'–' if r['shard_cpu_ms'] is None else format(r['shard_cpu_ms'], '.2f')} | "
                         f"{r['in_process_cpu_ms']:.2f} |")
        sv = t.get("service")
        if sv:
            lines += ["", f"The whole service in one process on one core (model, PRADA, log; no Ray), {sv['clients']} "
                          f"accounts in turn as in the pipeline, {sv['requests']} requests, median of {sv['rounds']} "
                          f"rounds: {sv['off_ms']:.2f} CPU ms per request with PRADA off, {sv['on_ms']:.2f} with it "
                          f"on, a ratio of **{sv['ratio']:.2f}**. That is PRADA's cost without the tier's hop: the "
                          f"pipeline's ratio would be this if Ray's calls cost nothing."]
        lines.append("")
    d = result.get("device")
    if d:
        cpu_threads = next((r.get("train_threads") for r in d["rows"] if r["device"] == "cpu"), None)
        threads = (f" (on the CPU on {cpu_threads} torch thread{'s' if cpu_threads > 1 else ''}, as every training "
                   f"here)" if cpu_threads else "")
        lines += ["## Devices" + measured(d), "",
                  f"{d['model']} on {'x'.join(map(str, d['input']))} inputs (random pixels), {d['clients']} clients x "
                  f"{d['batch']} images per request to {d['replicas']} replicas through handles, log on; training: one "
                  f"epoch over 2,048 images, batch 128{threads}; MAD (eps 0.5, last-layer Jacobian of a ResNet-18 "
                  f"surrogate) over 256 queries. "
                  + ("No GPU was visible where this ran: the GPU row is missing, not zero." if len(d["rows"]) == 1
                     else "On the GPU the replicas share it (1/replicas each)."), "",
                  "| device | raw images/s | served images/s | served ÷ raw | training images/s | MAD µs/query | "
                  "MAD max diff from CPU |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            diff = "" if r["mad_max_diff_from_cpu"] is None else f"{r['mad_max_diff_from_cpu']:.1e}"
            lines.append(f"| {r['device']} | {r['raw_images_per_s']:,.0f} | {r['served']['images_per_s']:,.0f} | "
                         f"{r['served_over_raw']:.2f} | {r['train_images_per_s']:,.0f} | {r['mad_us_per_query']:,.0f} "
                         f"| {diff} |")
        lines.append("")
    lk = result.get("linking")
    if lk:
        flagged = ", ".join(f"{a} {n}" for a, n in lk["flagged_by_link"].items())
        lines += ["## Linking's delay" + measured(lk), "",
                  f"`{lk['scenario']}` on {lk['replicas']} replicas and {lk['shards']} shards (`serve.replicas=2`). "
                  f"The linker flagged {lk['newly_flagged']} accounts; {lk['lag_zero']} of these flags reached the "
                  f"shards before the account sent another query; on average {lk['lag_mean']} queries, at most "
                  f"{lk['lag_max']}, were answered in between (with the detector inline in one process, 0). The log "
                  f"shows a flag only on an account's queries after it, so it counts fewer accounts flagged by "
                  f"linking: {flagged}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    script(main)
