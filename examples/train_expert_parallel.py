"""Expert-parallel training of a tiny MoE ViT on scikit-learn's 8x8 digits, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 examples/train_expert_parallel.py

Every rank holds all replicated parameters (patch embedding, attention, router, head) and E/W
of the experts of each MoE layer; each rank trains on its own slice of every batch. After each
backward, ``average_gradients`` all-reduces the replicated gradients and rescales the expert
ones (which the exchanges already summed over ranks), so the update is that of the global mean
loss. On GPUs: ``--backend nccl`` (one GPU per process).
"""

from __future__ import annotations

import argparse
import os

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits

import moe_kernels as mk
from moe_kernels.distributed import average_gradients, gather_state_dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    ap.add_argument("--experts", type=int, default=4, help="experts per MoE layer (a multiple of the ranks)")
    ap.add_argument("--save", default=None, help="rank 0 saves a single-process checkpoint here")
    args = ap.parse_args()

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)  # before init: NCCL binds each process to its GPU
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(1)  # W processes share the CPU cores
        device = torch.device("cpu")
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    # The same seed on every rank: replicated parameters must start equal (the experts are
    # upcycled copies of the dense MLP, equal anyway).
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
        embed_dim=32, depth=2, num_heads=2, num_classes=10, global_pool="avg", class_token=False,
    )  # fmt: skip
    mk.moeify(model, "every-1", num_experts=args.experts, k=2, capacity_factor=1.25, process_group=dist.group.WORLD)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [1797, 1, 8, 8]
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(1)  # every rank draws the same global batches
    per_rank = args.batch // world
    for step in range(args.steps):
        idx = torch.randint(0, len(labels), (args.batch,), generator=g)[rank * per_rank : (rank + 1) * per_rank]
        x, y = images[idx].to(device), labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        total = loss + mk.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        total.backward()
        average_gradients(model)
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            line = f"rank {rank}/{world} step {step:3d} loss {loss.item():.4f}"
            if step == args.steps - 1:  # accuracy on the rank's last batch (a collective: all ranks run it)
                line += f" batch accuracy {(model(x).argmax(-1) == y).float().mean().item():.2f}"
            print(line + "\n", end="", flush=True)  # one write: ranks share the terminal

    state = gather_state_dict(model)  # a collective: every rank calls it
    if rank == 0 and args.save:
        torch.save(state, args.save)
        print(f"rank 0 saved a single-process checkpoint to {args.save}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
