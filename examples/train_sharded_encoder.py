"""Train a small Perceiver encoder on a long input split across processes, on the CPU.

    torchrun --standalone --nproc-per-node 2 examples/train_sharded_encoder.py

Every rank holds one contiguous shard of each input sequence (here cut from a batch all ranks
generate alike; a real loader would read only its own shard). The encoder's cross-attention
attends to every rank's shard (perceiver_fast.nn.PerceiverEncoder with process_group=), the rest
of the model runs replicated, and DistributedDataParallel over the same group leaves every rank
with the gradients of the whole input, so the ranks stay in step. The task: tell which of 10
patterns was planted in 10% of a noise sequence of --length points.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import perceiver_fast as pf

CLASSES, CHANNELS = 10, 3


class Classifier(nn.Module):
    def __init__(self, process_group):
        super().__init__()
        self.embed = nn.Linear(CHANNELS, 32)  # runs on this rank's shard only
        self.encoder = pf.nn.PerceiverEncoder(32, num_latents=32, latent_dim=64, cross_heads=1, self_heads=4,
                                              self_layers=2, process_group=process_group)
        self.head = nn.Linear(64, CLASSES)

    def forward(self, shard):
        return self.head(self.encoder(self.embed(shard)).mean(dim=1))


def batch(step: int, size: int, length: int):
    """(inputs (size, length, CHANNELS), labels): the same on every rank for a given step."""
    generator = torch.Generator().manual_seed(step)
    labels = torch.randint(CLASSES, (size,), generator=generator)
    patterns = torch.randn(CLASSES, CHANNELS, generator=torch.Generator().manual_seed(1234))
    inputs = torch.randn(size, length, CHANNELS, generator=generator)
    planted = torch.rand(size, length, generator=generator) < 0.1
    inputs[planted] += 3 * patterns[labels].repeat_interleave(planted.sum(dim=1), dim=0)
    return inputs, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65536, help="input points per sequence (split over ranks)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # one core per rank
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Classifier(dist.group.WORLD))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lengths = [args.length // world + (r < args.length % world) for r in range(world)]
    start = sum(lengths[:rank])
    for step in range(args.steps):
        inputs, labels = batch(step, args.batch, args.length)
        shard = inputs[:, start:start + lengths[rank]]
        logits = model(shard)  # the same on every rank: the whole input was attended
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
            print(f"step {step:3d}  loss {loss.item():.3f}  batch accuracy {accuracy:.2f}  "
                  f"({world} ranks x {lengths[rank]} of {args.length} points)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
