"""ElasticBuffer end to end against ep-core's independent oracle, plus its API contract.

One spawned job per world size runs every case (spawning dominates the runtime). The oracle
worker is parametrised by backend so the same checks run on GPUs: the reference over NCCL, and
the NVLink backend compared bit for bit with the reference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ep_core.backend import DispatchResult, LowLatencyDispatchResult
from ep_core.handle import EPHandle, LowLatencyHandle
from ep_core.testing import Case, make_inputs, run_case, run_low_latency_case
from ep_elastic import ElasticBuffer
from ep_jit.testing import gpu_placements, run_ranks

CASES = [
    Case("fp8-expand-bias", fp8="fp8", expert_alignment=16, num_bias=2, seed=31),
    Case("ue8m0-nosync-masked", fp8="ue8m0", masked_ratio=0.25, do_cpu_sync=False, seed=32),
    Case("skewed-empty-rank", routing="skewed", empty_rank=1, expert_alignment=128, seed=33),
    Case(
        "group-limited-zero-tokens",
        routing="group-limited",
        num_tokens=(0, 19),
        num_bias=1,
        seed=34,
    ),
    Case("top8-nosync", num_topk=8, with_weights=False, do_cpu_sync=False, num_bias=1, seed=35),
]
LL_CASES = [
    (Case("ll-fp8", num_tokens=(9, 32), hidden=256, masked_ratio=0.2, seed=36), True, False, False),
    (Case("ll-ue8m0", hidden=512, seed=37), True, True, True),
    (Case("ll-bf16", num_tokens=(0, 5), hidden=128, seed=38), False, False, False),
]
NMAX, HIDDEN, TOPK = 32, 1024, 8


class BufferAsBackend:
    """Calls the buffer's public methods; with ``async_ops`` every call returns an event first."""

    name = "elastic"

    def __init__(self, buffer: ElasticBuffer, async_ops: bool = False) -> None:
        self.buffer = buffer
        self.async_ops = async_ops

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        *,
        num_experts: int,
        num_max_tokens_per_rank: int,
        expert_alignment: int,
        do_expand: bool,
        do_cpu_sync: bool,
        handle: EPHandle | None,
        num_sms: int,
    ) -> DispatchResult:
        data = x if x_scales is None else (x, x_scales)
        if handle is None:
            recv, idx, weights, out_handle, event = self.buffer.dispatch(
                data,
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                num_experts=num_experts,
                num_max_tokens_per_rank=num_max_tokens_per_rank,
                expert_alignment=expert_alignment,
                do_expand=do_expand,
                do_cpu_sync=do_cpu_sync,
                num_sms=num_sms,
                async_with_compute_stream=self.async_ops,
            )
        else:
            recv, idx, weights, out_handle, event = self.buffer.dispatch(
                data,
                topk_weights=topk_weights,
                handle=handle,
                do_expand=do_expand,
                async_with_compute_stream=self.async_ops,
            )
        event.current_stream_wait()
        if isinstance(recv, tuple):
            return DispatchResult(recv[0], recv[1], idx, weights, out_handle)
        return DispatchResult(recv, None, idx, weights, out_handle)

    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        num_sms: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights, event = self.buffer.combine(
            x,
            handle,
            topk_weights=topk_weights,
            bias=bias or None,
            num_sms=num_sms,
            async_with_compute_stream=self.async_ops,
        )
        with event:
            pass
        return out, weights

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        *,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
    ) -> tuple[LowLatencyDispatchResult, None]:
        recv, count, handle, event, hook = self.buffer.low_latency_dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            async_finish=self.async_ops,
            # A hook cannot be combined with async_finish; on the NVLink backend it launches
            # the receive here, on the current stream.
            return_recv_hook=not self.async_ops,
        )
        event.current_stream_wait()
        if hook is not None:
            hook()
        if isinstance(recv, tuple):
            return LowLatencyDispatchResult(recv[0], recv[1], count, handle), None
        return LowLatencyDispatchResult(recv, None, count, handle), None

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, None]:
        combined, event, hook = self.buffer.low_latency_combine(
            x, topk_idx, topk_weights, handle, out=out, async_finish=self.async_ops
        )
        if hook is not None:
            raise AssertionError("return_recv_hook=False must return hook None")
        event.current_stream_wait()
        return combined, None

    def destroy(self) -> None:
        self.buffer.destroy()


def oracle_worker(info: Any, backend: str, compare_with_torch: bool) -> None:
    """Every case through ElasticBuffer(backend=...), sync and async, against the oracle."""
    buffer = ElasticBuffer(
        info.group,
        num_max_tokens_per_rank=NMAX,
        hidden=HIDDEN,
        num_topk=TOPK,
        backend=backend,
        explicitly_destroy=True,
        device=info.device,
    )
    assert (buffer.rank_idx, buffer.num_ranks) == (info.rank, info.world_size)
    assert buffer.backend_name == ("torch" if info.device.type == "cpu" else buffer.backend_name)
    reference = None
    if compare_with_torch:
        reference = BufferAsBackend(
            ElasticBuffer(
                info.group,
                num_max_tokens_per_rank=NMAX,
                hidden=HIDDEN,
                backend="torch",
                device=info.device,
            )
        )
    for i, case in enumerate(CASES):
        be = BufferAsBackend(buffer, async_ops=i % 2 == 1)
        run_case(be, case, info.rank, info.world_size, info.device, reference=reference)
    for case, use_fp8, round_scale, use_ue8m0 in LL_CASES:
        run_low_latency_case(
            BufferAsBackend(buffer),
            case,
            info.rank,
            info.world_size,
            info.device,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
        )
    _check_stats(buffer, info)
    buffer.destroy()
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.dispatch(torch.zeros(1, 64, dtype=torch.bfloat16, device=info.device))


def _check_stats(buffer: ElasticBuffer, info: Any) -> None:
    case = Case("stats", seed=39)
    mine = make_inputs(case, info.rank, info.world_size)
    per_rank = case.num_experts // info.world_size
    stats = torch.full((per_rank,), 5, dtype=torch.int32, device=info.device)
    args = {"topk_idx": mine.topk_idx.to(info.device), "num_experts": case.num_experts}
    _, _, _, handle, _ = buffer.dispatch(
        mine.x.to(info.device), **args, cumulative_local_expert_recv_stats=stats
    )
    _, _, _, _, _ = buffer.dispatch(
        mine.x.to(info.device), **args, cumulative_local_expert_recv_stats=stats
    )
    want = handle.num_unaligned_recv_tokens_per_expert * 2 + 5
    assert torch.equal(stats, want), (stats, want)
    ll_stats = torch.zeros(per_rank, dtype=torch.int32, device=info.device)
    _, count, _, _, hook = buffer.low_latency_dispatch(
        mine.x.to(info.device),
        mine.topk_idx.to(info.device),
        NMAX,
        case.num_experts,
        cumulative_local_expert_recv_stats=ll_stats,
        use_fp8=False,
    )
    assert hook is None
    assert torch.equal(ll_stats, count)
    # Last: on the NVLink backend a rejected input ends the buffer (docs/ep-elastic.md, Errors).
    with pytest.raises(ValueError, match="cached dispatch"):
        buffer.dispatch(
            mine.x.to(info.device), handle=handle, cumulative_local_expert_recv_stats=stats
        )


@pytest.mark.parametrize("world_size", [2, 4])
def test_buffer_matches_oracle(world_size: int) -> None:
    run_ranks(world_size, oracle_worker, "auto", False, timeout_s=600, use_gpu=False)


@pytest.mark.gpu
@pytest.mark.multigpu(2)
def test_buffer_torch_backend_nccl() -> None:
    run_ranks(2, oracle_worker, "torch", False, timeout_s=600, use_gpu=True)


@pytest.mark.parametrize(("world_size", "per_gpu"), gpu_placements((2, 4)))
def test_buffer_nvlink_matches_torch(world_size: int, per_gpu: int) -> None:
    run_ranks(
        world_size,
        oracle_worker,
        "nvlink",
        True,
        timeout_s=900,
        use_gpu=True,
        ranks_per_gpu=per_gpu,
    )
