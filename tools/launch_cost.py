"""Host cost of launching a cached ep-jit kernel (one GPU), beside other ways to launch it.

    python tools/launch_cost.py [--launches 20000] [--batch 200] [--json out.json]

Prints the median microseconds of host time per launch over batches of ``--batch`` launches
(the stream is drained between batches, outside the timed loop, so the GPU queue never fills),
on torch's default stream and on a side stream, for:
  launch          ep_jit.Kernel.launch (cuda-bindings' cuLaunchKernel)
  bound           a BoundLaunch (Kernel.bind: arguments packed once) called again
  coop:launch     Kernel.launch(..., cooperative=True) (cuLaunchKernelEx with its attribute)
  coop:bound      a cooperative BoundLaunch (its cuLaunchKernelEx configuration cached)
  torch-add       torch.add(x, x, out=out), torch's own launch path, for scale
  cuda-core       cuda.core.launch of the same code (where cuda.core is installed), on a twin
                  kernel whose arguments are all scalars and pointers (cuda.core passes no
                  structs by value); ep-jit's launch and bound launch of that twin are timed too
and, to show where the time of a launch goes, its parts alone:
  part:stream     ep_jit's lookup of torch's current stream
  part:pack       checking and packing the five arguments
  part:bindings-call cuda-bindings' cuLaunchKernel with everything prepared
  part:ctypes-call   the driver's cuLaunchKernel entry point (cuGetProcAddress) called through
                     ctypes with everything prepared, the GIL released or kept (-gil): the
                     path ep-jit used before (it measured slower than cuda-bindings' wrapper)
The GPU work is a 256-thread toy kernel queued asynchronously.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import ep_jit
from ep_jit import _cuda
from ep_jit.kernels import AxpyArgs, toy_axpy_spec


class _Variant:
    """One way of launching: its callable and the stream it runs on."""

    def __init__(
        self,
        name: str,
        fn: Callable[[], object],
        stream: torch.cuda.Stream,
    ) -> None:
        self.name, self.fn, self.stream = name, fn, stream
        self.samples: list[float] = []

    def batch(self, launches: int) -> None:
        with torch.cuda.stream(self.stream):
            t0 = time.perf_counter()
            for _ in range(launches):
                self.fn()
            self.samples.append((time.perf_counter() - t0) / launches * 1e6)
        torch.cuda.synchronize()


_PLAIN_HEADER = """#pragma once
namespace launch_cost {
template <int kScale>
__device__ __forceinline__ void axpy(float* out, const float* x, const float* y, int offset,
                                     float alpha, long long n) {
  for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = kScale * (alpha * x[i]) + y[i] + offset;
}
}  // namespace launch_cost
"""


def _plain_kernel(root: str) -> ep_jit.Kernel:
    """The toy kernel's twin with scalar arguments only (what cuda.core can pass)."""
    folder = os.path.join(root, "launch_cost")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "plain.cuh"), "w") as f:
        f.write(_PLAIN_HEADER)
    ep_jit.register_include_root("launch_cost", root)
    spec = ep_jit.KernelSpec(
        name="launch_cost_plain_axpy",
        includes=["launch_cost/plain.cuh"],
        template="launch_cost::axpy",
        params=[
            "float* out",
            "const float* x",
            "const float* y",
            "int offset",
            "float alpha",
            "long long n",
        ],
        constants={"kScale": 2},
        launch_bounds=256,
    )
    return ep_jit.build(spec)


def _cuda_core_launcher(
    kernel: ep_jit.Kernel, out: torch.Tensor, x: torch.Tensor, stream: torch.cuda.Stream
) -> Callable[[], None]:
    from cuda.core import Device, LaunchConfig, ObjectCode, launch

    dev = Device(torch.cuda.current_device())
    dev.set_current()
    code = ObjectCode.from_cubin(kernel.entry.read_cubin())
    k = code.get_kernel(kernel.spec.entry)
    core_stream = dev.create_stream(stream)
    config = LaunchConfig(grid=1, block=256)
    o, xp = out.data_ptr(), x.data_ptr()
    offset, alpha, n = ctypes.c_int(0), ctypes.c_float(1.0), ctypes.c_longlong(256)

    def run() -> None:
        launch(core_stream, config, k, o, xp, xp, offset, alpha, n)

    return run


def _ctypes_launch(proto: Callable[..., Any]) -> Callable[..., int] | None:
    """The driver's cuLaunchKernel entry point as a ctypes function (legacy-stream semantics)."""
    flags = _cuda.driver.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_LEGACY_STREAM
    res = _cuda.driver.cuGetProcAddress(b"cuLaunchKernel", 12000, flags)
    if res[0] != _cuda.driver.CUresult.CUDA_SUCCESS or not int(res[1]):
        return None
    # CUresult cuLaunchKernel(CUfunction, 3 x grid, 3 x block, smem, CUstream, void**, void**)
    argtypes = [ctypes.c_void_p, *([ctypes.c_uint] * 7), ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p]  # fmt: skip
    fn: Callable[..., int] = proto(ctypes.c_int, *argtypes)(int(res[1]))
    return fn


def _parts(kernel: ep_jit.Kernel, args: tuple[object, ...]) -> dict[str, Callable[[], object]]:
    """The pieces of one Kernel.launch, each callable alone."""
    device = torch.cuda.current_device()
    params = kernel._packer.pack(args)
    func = kernel._functions[device]
    handle = _cuda.current_stream_handle(device)
    parts: dict[str, Callable[[], object]] = {
        "part:stream": lambda: _cuda.current_stream_handle(device),
        "part:pack": lambda: kernel._packer.pack(args),
    }
    fh = int(func)
    for suffix, proto in (("", ctypes.CFUNCTYPE), ("-gil", ctypes.PYFUNCTYPE)):
        entry = _ctypes_launch(proto)
        if entry is not None:
            parts[f"part:ctypes-call{suffix}"] = functools.partial(
                entry, fh, 1, 1, 1, 256, 1, 1, 0, handle, params, None
            )
    cu_stream = _cuda.driver.CUstream(handle)
    parts["part:bindings-call"] = lambda: _cuda.driver.cuLaunchKernel(
        func, 1, 1, 1, 256, 1, 1, 0, cu_stream, params, 0
    )
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=200, help="launches between two drains")
    parser.add_argument("--json", help="write the samples here")
    args = parser.parse_args()
    kernel = ep_jit.build(toy_axpy_spec(2))
    x = torch.ones(256, device="cuda")
    out = torch.empty_like(x)
    params = AxpyArgs(alpha=1.0, pad=0, n=256)
    kargs = (out, x, x, 0, params)
    expected = 2 * x + x
    side = torch.cuda.Stream()
    tmp = tempfile.mkdtemp(prefix="launch_cost_")
    try:
        plain = _plain_kernel(tmp)
    except Exception as exc:  # report, don't fail: the twin only serves the cuda.core column
        print(f"plain twin: not built ({type(exc).__name__}: {exc})")
        plain = None
    pargs = (out, x, x, 0, 1.0, 256)
    checked = (
        "launch",
        "bound",
        "coop:launch",
        "coop:bound",
        "twin:launch",
        "twin:bound",
        "twin:cuda-core",
    )
    variants: list[_Variant] = []
    for where, stream in (("default", torch.cuda.default_stream()), ("side", side)):
        with torch.cuda.stream(stream):
            fns: dict[str, Callable[[], object]] = {
                "launch": lambda: kernel.launch(1, 256, *kargs),
                "bound": kernel.bind(1, 256, *kargs),
                # Cooperative launches (cuLaunchKernelEx with its attribute), as ep-core's
                # high-throughput dispatch and combine kernels are launched.
                "coop:launch": lambda: kernel.launch(1, 256, *kargs, cooperative=True),
                "coop:bound": kernel.bind(1, 256, *kargs, cooperative=True),
                "torch-add": lambda: torch.add(x, x, out=out),
            }
            if plain is not None:
                fns["twin:launch"] = lambda: plain.launch(1, 256, *pargs)
                fns["twin:bound"] = plain.bind(1, 256, *pargs)
                try:
                    fns["twin:cuda-core"] = _cuda_core_launcher(plain, out, x, stream)
                except Exception as exc:  # report, don't fail: cuda.core is optional here
                    print(f"cuda-core: not measured ({type(exc).__name__}: {exc})")
            fns.update(_parts(kernel, kargs))
        for name, fn in fns.items():
            variant = _Variant(f"{name} ({where})", fn, stream)
            try:  # one variant failing must not hide the others
                variant.batch(1)
                if name in checked:
                    out.zero_()
                    torch.cuda.synchronize()
                    variant.batch(1)
                    ok = torch.equal(out, expected)
                    print(f"{variant.name}: result {'correct' if ok else 'WRONG'}")
            except Exception as exc:
                print(f"{variant.name}: not measured ({type(exc).__name__}: {exc})")
                continue
            variant.samples.clear()
            variants.append(variant)
    # Round robin over the variants, batch by batch: a drift of the host's speed during the run
    # moves every variant alike.
    for _ in range(max(1, args.launches // args.batch)):
        for variant in variants:
            variant.batch(args.batch)
    results = {v.name: v.samples for v in variants}
    name = torch.cuda.get_device_name()
    print(f"host cost per launch, {name}, batches of {args.batch}, {args.launches} launches:")
    for key, samples in results.items():
        print(
            f"  {key:28s} median {statistics.median(samples):6.2f} us "
            f"(min {min(samples):.2f}, max {max(samples):.2f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "batch": args.batch, "us_per_launch": results}, f, indent=1)


if __name__ == "__main__":
    main()
