"""Host cost of ep_jit.Kernel.launch for a cached kernel (one GPU): median of repeated batches.

    python tools/launch_cost.py [--launches 20000]

Prints microseconds of host time per launch (the GPU work is a 256-thread toy kernel, queued
asynchronously; the stream is drained outside the timed loop).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ep_jit
from ep_jit.kernels import AxpyArgs, toy_axpy_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    kernel = ep_jit.build(toy_axpy_spec(2))
    x = torch.ones(256, device="cuda")
    out = torch.empty_like(x)
    params = AxpyArgs(alpha=1.0, pad=0, n=256)
    kernel.launch(1, 256, out, x, x, 0, params)
    torch.cuda.synchronize()
    per_batch = args.launches // args.batches
    samples = []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            kernel.launch(1, 256, out, x, x, 0, params)
        samples.append((time.perf_counter() - t0) / per_batch * 1e6)
        torch.cuda.synchronize()
    print(
        f"Kernel.launch host cost: median {statistics.median(samples):.2f} us per launch "
        f"(min {min(samples):.2f}, max {max(samples):.2f}; {args.batches} x {per_batch} launches, "
        f"{torch.cuda.get_device_name()})"
    )


if __name__ == "__main__":
    main()
