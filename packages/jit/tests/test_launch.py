from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ep_jit
from ep_jit import JitLaunchError, knobs
from ep_jit.kernels import AxpyArgs, toy_axpy_spec


def _reference(
    x: torch.Tensor, y: torch.Tensor, scale: int, alpha: float, offset: int
) -> torch.Tensor:
    return scale * (alpha * x) + y + offset


# --- argument checks run before any CUDA call, so they are tested on CPU ---------------------


@pytest.fixture
def toy(jit_cache: Path) -> ep_jit.Kernel:
    knobs.jit.arch = "90a"
    return ep_jit.build(toy_axpy_spec(2))


def _axpy(n_terms: int, n: int) -> tuple[ep_jit.Kernel, torch.Tensor, torch.Tensor]:
    """The toy axpy kernel of ``n_terms`` terms and two random CUDA vectors of ``n`` floats."""
    kernel = ep_jit.build(toy_axpy_spec(n_terms))
    return kernel, torch.randn(n, device="cuda"), torch.randn(n, device="cuda")


def test_wrong_argument_count(toy: ep_jit.Kernel) -> None:
    with pytest.raises(TypeError, match=r"takes 5 arguments \(out, x, y, offset, args\), got 2"):
        toy.launch(1, 32, 0, 0)


def test_cpu_tensor_rejected(toy: ep_jit.Kernel) -> None:
    x = torch.zeros(4)
    with pytest.raises(TypeError, match=r"argument out .* expected a CUDA tensor"):
        toy.launch(1, 32, x, x, x, 0, AxpyArgs(1.0, 0, 4))


def test_scalar_checks(toy: ep_jit.Kernel) -> None:
    with pytest.raises(ValueError, match=r"offset=2147483648 .* c_int"):
        toy.launch(1, 32, 0, 0, 0, 1 << 31, AxpyArgs(1.0, 0, 4))
    with pytest.raises(TypeError, match=r"offset .* must be an int"):
        toy.launch(1, 32, 0, 0, 0, 1.5, AxpyArgs(1.0, 0, 4))
    with pytest.raises(TypeError, match="passed by value"):
        toy.launch(1, 32, 0, 0, 0, 1, 4)
    with pytest.raises(TypeError, match="pointer"):
        toy.launch(1, 32, "x", 0, 0, 1, AxpyArgs(1.0, 0, 4))


def test_shape_checks(toy: ep_jit.Kernel) -> None:
    args = (0, 0, 0, 1, AxpyArgs(1.0, 0, 4))
    with pytest.raises(ValueError, match="allows 256"):
        toy.launch(1, 512, *args)
    with pytest.raises(ValueError, match="grid"):
        toy.launch(0, 32, *args)
    with pytest.raises(ValueError, match="block"):
        toy.launch(1, (32, 1, 1, 1), *args)
    with pytest.raises(ValueError, match="smem"):
        toy.launch(1, 32, *args, smem=-1)


def test_bind_checks_arguments_once(toy: ep_jit.Kernel) -> None:
    with pytest.raises(TypeError, match=r"takes 5 arguments"):
        toy.bind(1, 32, 0, 0)
    with pytest.raises(ValueError, match="allows 256"):
        toy.bind(1, 512, 0, 0, 0, 1, AxpyArgs(1.0, 0, 4))


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["nvrtc", "nvcc"])
def test_toy_kernel_matches_torch(jit_cache: Path, compiler: str) -> None:
    kernel = ep_jit.build(toy_axpy_spec(3), compiler=compiler)
    for n in (1, 1000, 100_003):
        x = torch.randn(n, device="cuda")
        y = torch.randn(n, device="cuda")
        out = torch.full_like(x, float("nan"))
        kernel.launch(min(1024, (n + 255) // 256), 256, out, x, y, 7, AxpyArgs(0.5, 0, n))
        torch.testing.assert_close(out, _reference(x, y, 3, 0.5, 7))


@pytest.mark.gpu
def test_launch_options(jit_cache: Path) -> None:
    n = 4096
    kernel, x, y = _axpy(2, n)
    expected = _reference(x, y, 2, 1.0, 0)
    side = torch.cuda.Stream()
    variants = [
        {"smem": 100 * 1024},  # past 48 KiB: raises the kernel's limit first
        {"cluster": (2, 1, 1)},
        {"cooperative": True},
        {"stream": side},
        {"stream": side.cuda_stream},
    ]
    for kwargs in variants:
        out = torch.full_like(x, float("nan"))
        torch.cuda.synchronize()
        kernel.launch(8, 128, out, x, y, 0, AxpyArgs(1.0, 0, n), **kwargs)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, msg=f"launch with {kwargs}")


@pytest.mark.gpu
def test_launch_on_current_stream_is_ordered(jit_cache: Path) -> None:
    kernel = ep_jit.build(toy_axpy_spec(2))
    n = 1 << 20
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.randn(n, device="cuda")
        y = torch.zeros(n, device="cuda")
        out = torch.empty_like(x)
        for _ in range(3):
            kernel.launch(256, 256, out, x, y, 0, AxpyArgs(1.0, 0, n))
            y.copy_(out)  # stream-ordered after the kernel
    stream.synchronize()
    # out = 2x + y, y <- out: 2x, 4x, 6x only if each launch saw the previous copy.
    torch.testing.assert_close(out, 6 * x)


@pytest.mark.gpu
def test_driver_errors_are_named(jit_cache: Path) -> None:
    kernel = ep_jit.build(toy_axpy_spec(2))
    x = torch.zeros(4, device="cuda")
    with pytest.raises(JitLaunchError, match="CUDA_ERROR_INVALID_VALUE"):
        kernel.launch(1, 32, x, x, x, 0, AxpyArgs(1.0, 0, 4), smem=64 << 20)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(jit_cache: Path) -> None:
    n = 10_000
    kernel, x, y = _axpy(4, n)
    out = torch.empty_like(x)
    kernel.launch(40, 256, out, x, y, 1, AxpyArgs(1.0, 0, n))  # loads outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel.launch(40, 256, out, x, y, 1, AxpyArgs(1.0, 0, n))
    for _ in range(3):
        x.copy_(torch.randn(n, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, _reference(x, y, 4, 1.0, 1))


def test_importing_initialises_and_compiles_nothing() -> None:
    code = (
        "import sys, ep_jit, ep_jit.testing, torch; "
        "print(torch.cuda.is_initialized(), 'cuda.bindings.nvrtc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.gpu
def test_bound_launch_matches_launch(jit_cache: Path) -> None:
    n = 5000
    kernel, x, y = _axpy(2, n)
    out = torch.full_like(x, float("nan"))
    bound = kernel.bind(20, 256, out, x, y, 3, AxpyArgs(0.25, 0, n))
    bound()
    torch.testing.assert_close(out, _reference(x, y, 2, 0.25, 3))
    # Same pointers, new contents: the bound launch reads them again, on any stream.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.mul_(2)
        out.fill_(float("nan"))
        bound()
    for stream in (side, side.cuda_stream):
        bound(stream)
    side.synchronize()
    torch.testing.assert_close(out, _reference(x, y, 2, 0.25, 3))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bound()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _reference(x, y, 2, 0.25, 3))


@pytest.mark.gpu
def test_bound_launch_with_attributes_sees_struct_changes(jit_cache: Path) -> None:
    # Cooperative and cluster launches bound once (cuLaunchKernelEx); the by-value struct is
    # read at each call, so changing its fields in place changes what the next call passes.
    n = 4096
    kernel, x, y = _axpy(2, n)
    for kwargs in ({"cooperative": True}, {"cluster": (2, 1, 1)}):
        out = torch.full_like(x, float("nan"))
        args = AxpyArgs(1.0, 0, n)
        bound = kernel.bind(8, 128, out, x, y, 0, args, **kwargs)
        assert ("cooperative" in repr(bound)) == ("cooperative" in kwargs)
        bound()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, _reference(x, y, 2, 1.0, 0), msg=f"bind {kwargs}")
        args.alpha, args.n = 0.5, n // 2
        out.fill_(float("nan"))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        bound(side)  # a second stream: its own launch configuration
        side.synchronize()
        want = _reference(x, y, 2, 0.5, 0)
        torch.testing.assert_close(out[: n // 2], want[: n // 2], msg=f"bind {kwargs}")
        assert torch.isnan(out[n // 2 :]).all()


@pytest.mark.gpu
def test_launch_and_bound_launch_agree_and_name_refusals(jit_cache: Path) -> None:
    n = 3000
    kernel, x, y = _axpy(2, n)
    out = torch.full_like(x, float("nan"))
    kernel.launch(12, 256, out, x, y, 1, AxpyArgs(1.5, 0, n))
    bound_out = torch.full_like(x, float("nan"))
    torch.cuda.synchronize()  # the bound launch runs on a side stream
    kernel.bind(12, 256, bound_out, x, y, 1, AxpyArgs(1.5, 0, n))(torch.cuda.Stream())
    torch.cuda.synchronize()
    for result in (out, bound_out):
        torch.testing.assert_close(result, _reference(x, y, 2, 1.5, 1))
    # A launch the driver refuses (grid y over 65535) is named on both paths.
    with pytest.raises(JitLaunchError, match="CUDA_ERROR_INVALID_VALUE"):
        kernel.launch((1, 70000), 32, out, x, y, 0, AxpyArgs(1.0, 0, n))
    refused = kernel.bind((1, 70000), 32, out, x, y, 0, AxpyArgs(1.0, 0, n))
    with pytest.raises(JitLaunchError, match="CUDA_ERROR_INVALID_VALUE"):
        refused()
