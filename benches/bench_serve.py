"""Load test of ``python -m fastdiff serve``: 1, 4 and 16 concurrent clients, Triton's dynamic batching on and off.

    OMP_NUM_THREADS=1 python benches/bench_serve.py [--model digits] [--images 48] [--save]

Loopback only, bounded: each (batching, clients) case sends ``--images`` one-image requests in all (split evenly
over the clients, each client waiting for its answer before the next request), after one warm-up request per
client. Reports throughput (images/s over the case's wall time), p50 / p99 request latency, Triton's mean batch
size (inferences / executions from its statistics) and the number of failed or lost requests, which must be 0.
``--save`` writes ``benches/results/<machine>-<date>-serve.md`` with the machine, date, load and settings.
Not a pytest-benchmark suite: it drives its own threads against a server in this process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

CLIENTS = (1, 4, 16)




def run_case(server, clients: int, images: int) -> dict:
    from fastdiff.serve.client import Client

    per_client = max(1, images // clients)
    latencies: list[float] = []
    failures: list[str] = []
    received = [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        try:
            with Client(server.grpc_url) as c:
                c.sample(labels=[k % 10], seed=10_000 + k)  # warm-up: connection, first batch
                start.wait()
                for i in range(per_client):
                    t0 = time.perf_counter()
                    out = c.sample(labels=[(k + i) % 10], seed=k * 1000 + i)
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        received[0] += int(out.shape[0])
        except Exception as e:  # counted: the load test reports failures instead of stopping at the first
            with lock:
                failures.append(f"client {k}: {type(e).__name__}: {e}"[:300])
            start.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    before = server.statistics()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = server.statistics()
    executions = after["execution_count"] - before["execution_count"]
    inferences = after["inference_count"] - before["inference_count"]
    sent = clients * per_client
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"clients": clients, "requests": sent, "images": received[0], "failed": len(failures),
            "lost": sent - len(latencies) - len(failures), "wall_s": wall, "images_per_s": received[0] / wall,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "mean_batch": inferences / executions if executions else float("nan"), "errors": failures[:3]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the model's)")
    p.add_argument("--images", type=int, default=48, help="one-image requests per case, over all clients")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--save", action="store_true", help="write benches/results/<machine>-<date>-serve.md")
    args = p.parse_args(argv)

    import torch

    from fastdiff.serve.model import ServedModel
    from fastdiff.serve.server import Server, free_ports

    served = ServedModel(args.model, steps=args.steps, device="cpu")
    load_before = os.getloadavg()
    rows = []
    for batching in (False, True):
        http, grpc, metrics = free_ports(3)
        with Server(served, http, grpc, metrics, max_batch=args.max_batch,
                    max_queue_delay_us=args.max_queue_delay_us, dynamic_batching=batching) as server:
            for clients in CLIENTS:
                r = run_case(server, clients, args.images)
                r["batching"] = "on" if batching else "off"
                rows.append(r)
                print(f"batching {r['batching']:3s} clients {clients:2d}: {r['images_per_s']:6.2f} images/s, p50 "
                      f"{r['p50_ms']:7.1f} ms, p99 {r['p99_ms']:7.1f} ms, mean batch {r['mean_batch']:4.1f}, "
                      f"failed {r['failed']}, lost {r['lost']}", flush=True)
                for e in r["errors"]:
                    print("   ", e, flush=True)
    load_after = os.getloadavg()
    by = {(r["batching"], r["clients"]): r for r in rows}
    speedup = {c: by[("on", c)]["images_per_s"] / by[("off", c)]["images_per_s"] for c in CLIENTS}
    print("dynamic batching speed-up:", ", ".join(f"{c} clients {s:.2f}x" for c, s in speedup.items()))

    if args.save:
        cpu = platform.processor() or platform.machine()
        machine = f"CPU_{platform.machine()}_x{os.cpu_count()}"
        command = " ".join(sys.argv[1:] if argv is None else argv)
        date = datetime.date.today().isoformat()
        lines = [f"# fastdiff serve load test: {{'device': '{cpu} x{os.cpu_count()}', 'torch': '{torch.__version__}', "
                 f"'torch threads': {torch.get_num_threads()}, 'date': '{date}', "
                 f"'python': '{platform.python_version()}'}}",
                 "", f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benches/bench_serve.py "
                 f"{command}`: model {served.describe()}; PyTriton's tritonserver on loopback, "
                 f"gRPC client (fastdiff.serve.Client), one image per request, max batch {args.max_batch}, queue "
                 f"delay {args.max_queue_delay_us} us when batching is on. Load average (1/5/15 min) "
                 f"{'/'.join(f'{v:.2f}' for v in load_before)} before, {'/'.join(f'{v:.2f}' for v in load_after)} "
                 "after (a 2-core VM shared with other jobs: absolute numbers drift).", "",
                 "| batching | clients | requests | images/s | p50 (ms) | p99 (ms) | mean batch | failed | lost |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batching']} | {r['clients']} | {r['requests']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} "
                  f"| {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | {r['failed']} | {r['lost']} |" for r in rows]
        lines += ["", "Dynamic batching speed-up (images/s, on / off): "
                  + ", ".join(f"{c} clients {s:.2f}x" for c, s in speedup.items()) + "."]
        out = Path(__file__).resolve().parent / "results" / f"{machine}-{date}-serve.md"
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from fastdiff._atomic import atomic_write_text

        atomic_write_text(out, "\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 1 if any(r["failed"] or r["lost"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
