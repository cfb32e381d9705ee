"""Cost of each output defense: the defense alone, and served throughput relative to ``identity``.

    python benchmarks/defenses.py [--seconds 8] [--clients 4] [--batch 64] [--out benchmarks/results/defenses.json]
                                  [--report-only]

In one run on this machine, for the LeNet victim on mnist5k and batches of --batch test images:
  - alone: images/s of the defense by itself (clean probabilities and images in, returned vectors out),
    one torch thread, best of three windows;
  - served: images/s through Ray Serve (one replica, query log on, PRADA off, --clients actors), and
    that figure divided by the same measurement with ``identity``;
  - MAD and MAD-argmax against the per-sample reference implementation (one query at a time, K autograd
    calls for an explicit Jacobian, as in the paper's code): largest difference and the speed-up.
Writes JSON to --out and Markdown tables next to it (``--report-only``: rebuilds them from the JSON).
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import ray
import torch
from serving import served  # benchmarks/serving.py

from sim.cli import OneLineParser, count, description, output_file, positive, read_results, script

SETTINGS = {  # the defense settings measured (mid-range strengths)
    "identity": {},
    "top_k": {"k": 1},
    "rounding": {"decimals": 2},
    "labels_only": {},
    "reverse_sigmoid": {"beta": 0.7, "gamma": 0.5},
    "random_noise": {"eps": 0.5},
    "mad": {"eps": 0.8},
    "mad_argmax": {"eps": 0.8},
    "adaptive_misinformation": {"tau": 0.5},
    "confidence_gated": {"beta": 0.9},
}


def best_rate(fn, n_per_call: int, seconds: float) -> float:
    """Best of three windows of calls/s x n_per_call."""
    best = 0.0
    for _ in range(3):
        fn()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            fn()
            calls += 1
        best = max(best, calls * n_per_call / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = OneLineParser(prog="python benchmarks/defenses.py", description=description(__doc__))
    ap.add_argument("--seconds", type=positive, default=8.0, help="per measurement")
    ap.add_argument("--clients", type=count, default=4)
    ap.add_argument("--batch", type=count, default=64)
    ap.add_argument("--reference-queries", type=count, default=64, help="queries for the per-sample MAD")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "defenses.json"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the Markdown tables from --out")
    args = ap.parse_args()
    if args.report_only:
        write_markdown(read_results(args.out, ("machine", "victim", "batch", "clients", "defenses", "mad_vs_reference"),
                                    "benchmarks/defenses.py"), args.out)
        return
    args.out = output_file(args.out)

    from sim import config, defenses, zoo
    from sim.defenses.mad import reference_perturb
    from sim.training import predict_probs

    torch.set_num_threads(1)
    cfg = config.load("mad_vs_knockoff")
    victim = zoo.get_victim(cfg.victim, cfg.data, cfg.seed, cfg.cache_dir)
    ctx = zoo.ModelContext.of(cfg, victim)
    mis = {"misinformation": ctx.misinformation_model()}  # as a run prepares it
    images = victim.dataset.x_test
    x = images[:args.batch]
    clean = predict_probs(victim.model, x)
    forward = best_rate(lambda: predict_probs(victim.model, x), len(x), args.seconds)
    print(f"victim forward pass alone: {forward:,.0f} images/s (1 thread, batch {args.batch})", flush=True)

    rows = []
    for name, params in SETTINGS.items():
        d = defenses.build(name, victim=victim.model, models=mis, **params)
        rate = best_rate(lambda: d(clean, x), len(x), args.seconds)
        rows.append({"defense": name, "params": params, "alone_images_per_s": round(rate, 1)})
        print(f"{name:<24} alone {rate:>12,.0f} images/s", flush=True)

    mad_check = {}
    xr, yr = images[:args.reference_queries], predict_probs(victim.model, images[:args.reference_queries])
    for name in ("mad", "mad_argmax"):
        d = defenses.build(name, victim=victim.model, **SETTINGS[name])

        def reference():
            return reference_perturb(torch.as_tensor(yr), torch.as_tensor(xr), d.surrogate, SETTINGS[name]["eps"],
                                     keep_top1=name == "mad_argmax")

        ref = reference()
        ref_rate = best_rate(reference, len(xr), args.seconds)  # timed as the batched one is: the best window
        ours = best_rate(lambda: d(yr, xr), len(xr), args.seconds)
        diff = float(np.abs(d(yr, xr) - ref.numpy()).max())
        mad_check[name] = {"reference_images_per_s": round(ref_rate, 1), "batched_images_per_s": round(ours, 1),
                           "speedup": round(ours / ref_rate, 1), "max_abs_difference": diff}
        print(f"{name}: per-sample reference {ref_rate:,.0f} images/s, batched {ours:,.0f}: "
              f"{ours / ref_rate:.1f}x faster, max |difference| {diff:.2e}", flush=True)

    from sim.engine import init_local_ray

    init_local_ray(num_cpus=os.cpu_count())
    from ray import serve

    serve.start(http_options={"location": "NoServer"})
    for row in rows:
        spec = {"name": row["defense"], **row["params"]}
        r = served(victim, images, log=True, detectors={}, clients=args.clients, batch=args.batch,
                   seconds=args.seconds, defense=spec, defense_models=defenses.prepare(spec, ctx))
        row["served_images_per_s"] = r["images_per_s"]
        row["served_p50_ms"] = r["p50_ms"]
        row["served_over_identity"] = round(row["served_images_per_s"] / rows[0]["served_images_per_s"], 3)
        print(f"{row['defense']:<24} served {row['served_images_per_s']:>10,.0f} images/s "
              f"({row['served_over_identity']:.2f} x identity)", flush=True)  # as each is measured: minutes in all
    ray.shutdown()

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__},
        "victim": {"arch": victim.arch, "dataset": cfg.victim.dataset, "test_accuracy": victim.test_accuracy},
        "batch": args.batch, "clients": args.clients, "seconds_per_measurement": args.seconds,
        "victim_forward_images_per_s": round(forward, 1), "defenses": rows, "mad_vs_reference": mad_check,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    write_markdown(result, args.out)
    print(f"written to {args.out}")


def write_markdown(result: dict, out: str) -> None:
    """The tables next to the JSON: each defense alone and served, and batched MAD against the reference."""
    m = result["machine"]
    lines = [f"Measured on {m['cpus']} CPUs (Python {m['python']}, torch {m['torch']}, Ray {m['ray']}); victim "
             f"{result['victim']['arch']} on {result['victim']['dataset']}, batches of {result['batch']} images, "
             f"{result['clients']} clients when served.", "",
             "| defense | settings | alone (images/s) | served (images/s) | served ÷ identity |",
             "|---|---|---:|---:|---:|"]
    for row in result["defenses"]:
        settings = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "–"
        lines.append(f"| `{row['defense']}` | {settings} | {row['alone_images_per_s']:,.0f} | "
                     f"{row['served_images_per_s']:,.0f} | {row['served_over_identity']:.2f} |")
    lines += ["", "MAD's batched code against the per-sample reference (one query at a time, an explicit Jacobian), "
              "on the same queries:", "",
              "| defense | reference (images/s) | batched (images/s) | speed-up | largest difference |",
              "|---|---:|---:|---:|---:|"]
    for name, r in result["mad_vs_reference"].items():
        lines.append(f"| `{name}` | {r['reference_images_per_s']:,.0f} | {r['batched_images_per_s']:,.0f} | "
                     f"{r['speedup']:.1f}x | {r['max_abs_difference']:.1e} |")
    with open(os.path.splitext(out)[0] + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    script(main)
