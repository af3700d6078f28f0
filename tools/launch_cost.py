"""Host cost of launching a cached ep-jit kernel (one GPU), beside other ways to launch it.

    python tools/launch_cost.py [--launches 20000] [--json out.json]

Prints the median microseconds of host time per launch over batches, for:
  launch          ep_jit.Kernel.launch (the driver's cuLaunchKernel through ctypes)
  launch-bindings the same, through cuda-bindings' cuLaunchKernel wrapper
  bound           a BoundLaunch (Kernel.bind: arguments packed once) called again
  torch-add       torch.add(x, x, out=out), torch's own launch path, for scale
  cuda-core       cuda.core.launch of the same cubin (where cuda.core is installed)
The GPU work is a 256-thread toy kernel queued asynchronously; the stream is drained outside the
timed loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

import ep_jit
import ep_jit.launch as launch_mod
from ep_jit.kernels import AxpyArgs, toy_axpy_spec


def _time(fn: Callable[[], None], launches: int, batches: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    per_batch = launches // batches
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        samples.append((time.perf_counter() - t0) / per_batch * 1e6)
        torch.cuda.synchronize()
    return samples


def _cuda_core_launcher(
    kernel: ep_jit.Kernel, out: torch.Tensor, x: torch.Tensor
) -> Callable[[], None]:
    import ctypes

    from cuda.core import Device, LaunchConfig, ObjectCode, launch  # type: ignore[import-not-found]

    dev = Device(torch.cuda.current_device())
    dev.set_current()
    code = ObjectCode.from_cubin(kernel.entry.read_cubin())
    k = code.get_kernel(kernel.spec.entry)
    stream = dev.create_stream(torch.cuda.current_stream())
    config = LaunchConfig(grid=1, block=256)
    params = AxpyArgs(alpha=1.0, pad=0, n=256)

    # Pointers as plain ints (cuda.core passes them as intptr_t), the int by its C type, the
    # struct by value as ctypes gives it.
    def run() -> None:
        launch(stream, config, k, out.data_ptr(), x.data_ptr(), x.data_ptr(), ctypes.c_int(0),
               params)  # fmt: skip

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()
    kernel = ep_jit.build(toy_axpy_spec(2))
    x = torch.ones(256, device="cuda")
    out = torch.empty_like(x)
    params = AxpyArgs(alpha=1.0, pad=0, n=256)
    expected = 2 * x + x

    def launch() -> None:
        kernel.launch(1, 256, out, x, x, 0, params)

    variants: dict[str, Callable[[], None]] = {"launch": launch}
    raw = launch_mod.raw_launch_kernel
    variants["bound"] = kernel.bind(1, 256, out, x, x, 0, params)
    variants["torch-add"] = lambda: torch.add(x, x, out=out)
    try:
        variants["cuda-core"] = _cuda_core_launcher(kernel, out, x)
    except Exception as exc:  # report, don't fail: cuda.core is optional here
        print(f"cuda-core: not measured ({type(exc).__name__}: {exc})")
    results: dict[str, list[float]] = {}
    for name, fn in variants.items():
        try:
            results[name] = _time(fn, args.launches, args.batches)
        except Exception as exc:  # one variant failing must not hide the others
            print(f"{name}: not measured ({type(exc).__name__}: {exc})")
            continue
        if name != "torch-add":
            out.zero_()
            fn()
            torch.cuda.synchronize()
            ok = torch.equal(out, expected)
            print(f"{name}: result {'correct' if ok else 'WRONG'}")
    launch_mod.raw_launch_kernel = lambda: None  # type: ignore[assignment]
    try:
        results["launch-bindings"] = _time(launch, args.launches, args.batches)
    finally:
        launch_mod.raw_launch_kernel = raw  # type: ignore[assignment]
    name = torch.cuda.get_device_name()
    print(f"host cost per launch, {name}, {args.batches} x {args.launches // args.batches}:")
    for key, samples in results.items():
        print(
            f"  {key:16s} median {statistics.median(samples):6.2f} us "
            f"(min {min(samples):.2f}, max {max(samples):.2f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "us_per_launch": results}, f, indent=1)


if __name__ == "__main__":
    main()
