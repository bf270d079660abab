"""The cost of expert parallelism's exchange: 2 gloo processes on the CPU.

``run_exchange_bench()`` spawns W=2 processes and returns records in the suite's JSON schema,
case ``"ep2_exchange"``, modes ``fwd`` and ``fwd_bwd``, fp32, one per impl:

- ``moe_kernels``: ``MoEMlp(process_group=...)``, experts sharded over the 2 ranks, each rank
  feeding its own T tokens;
- ``local``: the same layer with all E experts in one process, on one rank's T tokens (what the
  sharded layer must match: its cost minus the expert work of the other rank, plus the exchange);
- ``all_to_all``: the exchange alone with the layer's split sizes: counts, token rows out,
  output rows back (``fwd_bwd`` adds the two reverse exchanges of the backward);
- ``all_to_all_padded``: the same exchange sending the full padded ``[E, G*C, D]`` buffer,
  empty slots included, instead of only the kept rows (what packing saves).

A collective is as slow as its slowest rank: each timed iteration starts at a barrier and
counts the maximum over the ranks; median and interquartile range over a fixed number of
iterations (adaptive repeat counts would let the ranks disagree on how many collectives to run).
Extra fields: ``world_size``, ``tokens_per_rank``, ``rows_sent`` (kept rows this rank sends,
rank 0) and ``rows_padded`` (the padded buffer's rows).

    python -m bench.distributed [--json PATH]
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch

CASE = "ep2_exchange"


def _timed(fn, iters: int, warmup: int = 3) -> tuple[float, float, int]:
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank, iteration by iteration
    times = t.tolist()
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0], len(times)


def _worker(rank: int, W: int, port: int, cfg: dict, out_path: str) -> None:
    import torch.distributed as dist

    import moe_kernels as mk
    from bench.measure import peak_memory_mb
    from moe_kernels.distributed import load_sharded
    from moe_kernels.expert_parallel import _exchange_plan, all_to_all

    torch.set_num_threads(1)  # W processes share the cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
        timeout=datetime.timedelta(seconds=cfg["timeout_s"]),
    )  # fmt: skip
    try:
        T, D, H, E, K = cfg["tokens"], cfg["width"], cfg["hidden"], cfg["experts"], cfg["k"]
        kw = dict(num_experts=E, k=K, capacity_factor=cfg["capacity_factor"], noise_std=0.0)
        torch.manual_seed(0)
        local = mk.MoEMlp(D, H, **kw)
        ep = mk.MoEMlp(D, H, process_group=dist.group.WORLD, **kw)
        load_sharded(ep, local.state_dict())
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
        grad = torch.randn(T, D, generator=torch.Generator().manual_seed(10 + rank))
        routing = local.router(x.detach(), capacity_factor=cfg["capacity_factor"]).plan
        counts = routing.counts
        plan = _exchange_plan(counts, W, dist.group.WORLD)
        N, M = sum(plan.send_splits), sum(plan.recv_splits)
        R = routing.num_rows
        rows_out = torch.randn(N, D, requires_grad=True)
        pad_out = torch.randn(R, D, requires_grad=True)
        pad_splits = [R // W] * W

        def exchange(rows, send, recv):
            _exchange_plan(counts, W, dist.group.WORLD)  # the counts and the host sync
            back = all_to_all(all_to_all(rows, recv, send), send, recv)
            return back

        impls = {
            "moe_kernels": lambda: ep(x),
            "local": lambda: local(x),
            "all_to_all": lambda: exchange(rows_out, plan.send_splits, plan.recv_splits),
            "all_to_all_padded": lambda: exchange(pad_out, pad_splits, pad_splits),
        }
        records = []
        for impl, fn in impls.items():
            for mode in cfg["modes"]:
                if mode == "fwd":
                    run = fn
                else:

                    def run(fn=fn):
                        out = fn()
                        out.backward(grad if out.shape == grad.shape else torch.ones_like(out))

                med, iqr, n = _timed(run, cfg["iters"])
                peak = peak_memory_mb(run, torch.device("cpu"))
                records.append(dict(
                    case=CASE, impl=impl, mode=mode, dtype="fp32", median_ms=round(med, 4),
                    iqr_ms=round(iqr, 4), peak_mem_mb=None if peak is None else round(peak, 2), runs=n,
                    world_size=W, tokens_per_rank=T, rows_sent=N, rows_received=M, rows_padded=R,
                ))  # fmt: skip
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(records, f)
    finally:
        dist.destroy_process_group()


def run_exchange_bench(
    *,
    tokens: int = 394,
    width: int = 192,
    hidden: int = 768,
    experts: int = 8,
    k: int = 2,
    capacity_factor: float | None = 1.05,
    iters: int = 20,
    modes: tuple[str, ...] = ("fwd", "fwd_bwd"),
    timeout_s: float = 300.0,
    log=print,
) -> list[dict]:
    """Measure the 2-process expert-parallel layer against the local one, and its exchange.

    Defaults: 394 tokens per rank (two 197-token ViT-S/16-ish images), D=192, H=768, E=8, K=2,
    capacity factor 1.05 (one group per rank). Returns the records described in the module
    docstring (rank 0's split sizes; times are the slowest rank's). Raises ``RuntimeError`` if
    a process fails or the run passes ``timeout_s``.
    """
    W = 2
    cfg = dict(tokens=tokens, width=width, hidden=hidden, experts=experts, k=k, capacity_factor=capacity_factor,
               iters=iters, modes=tuple(modes), timeout_s=timeout_s)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "records.json")
        procs = [ctx.Process(target=_worker, args=(r, W, port, cfg, out_path), daemon=True) for r in range(W)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(max(0.0, timeout_s - (time.monotonic() - t0)))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in alive:
            procs[r].kill()
        if alive or any(p.exitcode != 0 for p in procs) or not os.path.exists(out_path):
            raise RuntimeError(
                f"bench.distributed: ranks {alive} timed out after {timeout_s} s" if alive
                else f"bench.distributed: exit codes {[p.exitcode for p in procs]}"
            )  # fmt: skip
        with open(out_path) as f:
            records = json.load(f)
    for r in records:
        log(f"  {r['case']:<16} {r['impl']:<18} {r['mode']:<8} {r['dtype']:<5} {r['median_ms']:10.3f} ms"
            f" ± {r['iqr_ms']:.3f}  peak {r['peak_mem_mb']} MB"
            f"  rows sent {r['rows_sent']} / padded {r['rows_padded']}")  # fmt: skip
    return records


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="write the records as JSON")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    recs = run_exchange_bench(iters=args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": recs}, f, indent=1)
