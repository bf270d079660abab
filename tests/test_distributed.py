"""Expert parallelism: a layer sharded over W gloo processes equals the single-process layer.

Each world size spawns its W processes once (importing torch dominates on a small machine) and
every process runs all the cases; the tests then read each rank's verdict per case. Each rank
feeds its own token batch; the single-process reference (every process computes it for every
rank's batch, the shapes are tiny) runs each batch through the full layer. A process that fails
to start or hangs is killed at the deadline and fails the tests; collectives time out on their
own (``init_process_group(timeout=...)``), and every process destroys its group.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
from torch import nn

WORLD_SIZES = (2, 4)
DEADLINE_S = 150  # per world size: spawn, import, all cases
COLLECTIVE_TIMEOUT_S = 60
ATOL, RTOL = 1e-5, 1e-4  # fp32; expert GEMMs see other row counts than the reference's

# name -> (MoEMlp keywords, experts per rank, tokens per rank, what it covers)
CASES = {
    "dropless": (dict(capacity_factor=None, k=2), 2, 10, "packed buffers, permutation (2 local experts)"),
    "capacity": (dict(capacity_factor=1.0, k=2, group_size=6), 2, 12, "padded buffers with drops, 2 groups"),
    "capacity_bpr_k1_nobias": (
        dict(capacity_factor=1.25, k=1, group_size=7, batch_priority=True, bias=False),
        2,
        14,
        "BPR, K=1, no biases",
    ),
    "one_expert_per_rank": (dict(capacity_factor=None, k=2), 1, 9, "E = W: received order is expert-major"),
    "expert_choice": (dict(router="expert_choice", capacity_factor=1.0), 2, 8, "expert-choice padded plan"),
    "empty_ranks_dropless": (dict(capacity_factor=None, k=2), 2, 10, "every token to rank 0's experts"),
    "empty_ranks_capacity": (dict(capacity_factor=1.0, k=2), 2, 10, "every token to rank 0's experts, drops"),
    "no_tokens_on_rank1": (dict(capacity_factor=None, k=2), 2, 10, "rank 1 has T=0 and still joins"),
}
EXTRA = ("indivisible_experts", "moeify_vit_load_sharded")


def _batches(W: int, T: int, D: int, Dout: int, positive_feature: bool, no_tokens: bool):
    xs, gs = [], []
    for r in range(W):
        g = torch.Generator().manual_seed(100 + r)
        t = 0 if (no_tokens and r == 1) else T + r  # ranks differ in size
        x = torch.randn(t, D, generator=g)
        if positive_feature:
            x[:, 0] = 3.0 + x[:, 0].abs()  # a constant-sign feature the router keys on
        xs.append(x)
        gs.append(torch.randn(t, Dout, generator=g))
    return xs, gs


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()  # no tokens: no gradient


def _run_layer(layer, x, gout):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * gout).sum().backward()
    return out.detach(), x.grad


def _case(name: str, rank: int, W: int) -> None:
    import moe_kernels as mk
    from moe_kernels.distributed import load_sharded

    kw, per_rank, T, _ = CASES[name]
    E, D, H, Dout = per_rank * W, 6, 10, 5
    torch.manual_seed(0)
    full = mk.MoEMlp(D, H, Dout, num_experts=E, noise_std=0.0, **kw)
    empty_ranks = name.startswith("empty_ranks")
    if empty_ranks:
        with torch.no_grad():
            full.router.weight.mul_(0.1)
            full.router.weight[:, 0] = -10.0
            full.router.weight[:per_rank, 0] = 10.0  # rank 0's experts win every token
    if name == "capacity":
        with torch.no_grad():
            full.router.weight[0, 0] = 10.0  # every token's 1st choice: more than C=4 per group
    gs_size = kw.get("group_size")
    xs, gouts = _batches(W, T, D, Dout, empty_ranks or name == "capacity", name == "no_tokens_on_rank1")
    if gs_size:  # every rank's T must be a multiple of the group size
        xs = [x[: (x.shape[0] // gs_size) * gs_size] for x in xs]
        gouts = [g[: x.shape[0]] for g, x in zip(gouts, xs, strict=True)]

    refs = []
    for x, g in zip(xs, gouts, strict=True):
        full.zero_grad()
        out, gx = _run_layer(full, x, g)
        grads = {n: _grad(p) for n, p in full.named_parameters()}
        refs.append((out, gx, grads))

    ep = mk.MoEMlp(D, H, Dout, num_experts=E, noise_std=0.0, process_group=torch.distributed.group.WORLD, **kw)
    assert ep.fc1_weight.shape == (per_rank, H, D), ep.fc1_weight.shape
    load_sharded(ep, full.state_dict())
    out, gx = _run_layer(ep, xs[rank], gouts[rank])
    ref_out, ref_gx, ref_grads = refs[rank]
    close = dict(atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out, ref_out, **close, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(gx, ref_gx, **close, msg=lambda m: f"input grad: {m}")
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    for n, p in ep.named_parameters():
        if n.startswith("router"):  # replicated: the gradient of this rank's tokens only
            want = ref_grads[n]
        else:  # sharded: every rank's tokens, summed
            want = sum(ref[2][n] for ref in refs)[lo:hi]
        torch.testing.assert_close(_grad(p), want, **close, msg=lambda m, n=n: f"grad of {n}: {m}")
    if empty_ranks:
        assert all(ep.router(x, capacity_factor=kw["capacity_factor"]).plan.indices.max() < per_rank for x in xs)
        if rank > 0:
            assert not ep.fc1_weight.grad.any(), "experts of an empty rank received gradient"
    if name == "capacity":  # the case must actually drop assignments
        r = full.router(xs[rank], capacity_factor=1.0, group_size=gs_size).plan
        assert int(r.counts.sum()) < xs[rank].shape[0] * 2, "no assignment was dropped"


def _extra(name: str, rank: int, W: int) -> None:
    import moe_kernels as mk

    group = torch.distributed.group.WORLD
    if name == "indivisible_experts":
        try:
            mk.MoEMlp(4, num_experts=2 * W + 1, process_group=group)
        except ValueError as e:
            assert f"num_experts={2 * W + 1}" in str(e) and f"world size {W}" in str(e), str(e)
        else:
            raise AssertionError("no error for num_experts not divisible by the world size")
        return
    if name == "moeify_vit_load_sharded":
        try:
            import timm
        except ImportError:
            return
        from moe_kernels.distributed import gather_state_dict, load_sharded

        def vit():
            torch.manual_seed(0)
            return timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=16, num_heads=2,
                img_size=16, patch_size=8, num_classes=3,
            )  # fmt: skip

        E = 2 * W
        torch.manual_seed(1)
        single = mk.moeify(vit(), "every-1", num_experts=E, capacity_factor=1.0, noise_std=0.0)
        with torch.no_grad():  # distinct experts, so a wrong shard would show
            for m in single.modules():
                if isinstance(m, mk.MoEMlp):
                    m.fc1_weight.add_(0.1 * torch.randn_like(m.fc1_weight))
        sharded = mk.moeify(vit(), "every-1", num_experts=E, capacity_factor=1.0, noise_std=0.0, process_group=group)
        load_sharded(sharded, single.state_dict())
        assert sharded.blocks[0].mlp.fc1_weight.shape[0] == 2
        x = torch.randn(2 + rank, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
        torch.testing.assert_close(sharded(x), single(x), atol=ATOL, rtol=RTOL)
        back = gather_state_dict(sharded)
        for k, v in single.state_dict().items():
            assert torch.equal(back[k], v), k
        return
    raise KeyError(name)


def _worker(rank: int, W: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {}
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=W,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        for name in (*CASES, *EXTRA):
            try:
                (_case if name in CASES else _extra)(name, rank, W)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            # Keep the ranks in step even after a case failed halfway through its collectives.
            torch.distributed.barrier()
    except Exception:
        results["__init__"] = traceback.format_exc()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def world(request, tmp_path_factory):
    W = request.param
    out = tmp_path_factory.mktemp(f"ep{W}")
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, W, port, str(out)), daemon=True) for r in range(W)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, DEADLINE_S - (time.monotonic() - t0)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    if hung:
        pytest.fail(f"W={W}: ranks {hung} still running after {DEADLINE_S} s, killed")
    results = {}
    for r, p in enumerate(procs):
        path = out / f"rank{r}.json"
        if not path.exists():
            pytest.fail(f"W={W}: rank {r} exited with code {p.exitcode} without results")
        results[r] = json.loads(path.read_text())
        assert "__init__" not in results[r], results[r]["__init__"]
    return W, results


@pytest.mark.parametrize("case", [*CASES, *EXTRA])
def test_expert_parallel_matches_single_process(world, case):
    W, results = world
    failures = {r: res.get(case, "not run") for r, res in results.items() if res.get(case) != "ok"}
    assert not failures, "\n".join(f"--- rank {r} of {W}:\n{tb}" for r, tb in failures.items())


def test_needs_initialised_group():
    import moe_kernels as mk

    if torch.distributed.is_initialized():
        pytest.skip("a default group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        mk.MoEMlp(4, num_experts=2, process_group=object())


def test_layer_without_group_is_unchanged():
    import moe_kernels as mk

    layer = mk.MoEMlp(4, 8, num_experts=4)
    assert layer.process_group is None and layer.fc1_weight.shape == (4, 8, 4)
    assert isinstance(layer, nn.Module)
