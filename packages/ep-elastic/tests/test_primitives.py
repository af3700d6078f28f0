"""ElasticBuffer's DeepEP V2 names for the other primitives, delegated to our packages (gloo)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ep_elastic._primitives as primitives
from ep_elastic import ElasticBuffer
from ep_jit.testing import run_ranks


def test_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(primitives.importlib, "import_module", absent)
    for extra, method, dist in (
        ("cp", "all_gather", "cp-copyengine"),
        ("pp", "pp_send", "pp-rdma"),
        ("engram", "engram_fetch", "ep-engram"),
    ):
        with pytest.raises(ImportError, match=rf"ElasticBuffer\.{method} needs the {dist} "):
            primitives._package(extra, method)


def test_broken_install_is_not_reported_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> None:
        raise ModuleNotFoundError("No module named 'nixl_cu13'", name="nixl_cu13")

    monkeypatch.setattr(primitives.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="nixl_cu13"):
        primitives._package("pp", "pp_send")


def _delegation_worker(info: Any) -> None:
    rank, r = info.rank, info.world_size
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=8, hidden=128, num_topk=2)
    with pytest.raises(RuntimeError, match="agrs_set_config"):
        buf.all_gather(torch.zeros(2))

    # All-gather sessions: one in-place tensor and one batch of two.
    buf.agrs_set_config(4096, 4)
    with buf.agrs_new_session():
        slot = buf.agrs_get_inplace_tensor((2, 3), torch.float32)
        assert isinstance(slot, torch.Tensor)
        slot.copy_(torch.full((2, 3), float(rank)))
        gathered, handle = buf.all_gather(slot)
        a, b, handle2 = buf.all_gather(
            [torch.arange(3, dtype=torch.float32) + rank, torch.full((5,), float(-rank))]
        )
        handle()
        handle2()
        for p in range(r):
            assert torch.equal(gathered[p], torch.full((2, 3), float(p)))
            assert torch.equal(a[p], torch.arange(3, dtype=torch.float32) + p)
            assert torch.equal(b[p], torch.full((5,), float(-p)))
    buf.create_agrs_session()
    shards, handle = buf.reduce_scatter(torch.ones(2 * r, 4) * (rank + 1))
    handle()
    assert torch.equal(shards, torch.full((2, 4), float(sum(range(1, r + 1)))))
    buf.destroy_agrs_session()

    # Pipeline send/recv around a ring.
    buf.pp_set_config(256, 2)
    nxt, prev = (rank + 1) % r, (rank - 1) % r
    for step in range(3):
        buf.pp_send(torch.full((16,), float(100 * rank + step)), nxt)
        out = torch.empty(16)
        buf.pp_recv(out, prev)
        assert torch.equal(out, torch.full((16,), float(100 * prev + step)))

    # Engram: each rank owns 5 rows; fetch rows of every rank, with -1.
    rows = 5
    storage = (torch.arange(rows * 128, dtype=torch.float32).view(rows, 128) + 1000 * rank).to(
        torch.bfloat16
    )
    with pytest.raises(RuntimeError, match="engram_write"):
        buf.engram_fetch(torch.zeros(1, 1, dtype=torch.int32))
    buf.engram_write(storage)
    idx = torch.tensor([[0, rows * r - 1], [-1, rows + 2]], dtype=torch.int32)
    data, sf = buf.engram_fetch(idx)()
    assert sf is None
    table = torch.cat(
        [
            (torch.arange(rows * 128, dtype=torch.float32).view(rows, 128) + 1000 * p).to(
                torch.bfloat16
            )
            for p in range(r)
        ]
    )
    expected = torch.stack(
        [
            torch.cat([table[0], table[rows * r - 1]]),
            torch.cat([torch.zeros(128, dtype=torch.bfloat16), table[rows + 2]]),
        ]
    )
    assert torch.equal(data, expected)
    buf.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buf.pp_send(torch.zeros(1), nxt)


@pytest.mark.parametrize("world", [2])
def test_elastic_buffer_delegates_to_the_primitive_packages(world: int) -> None:
    pytest.importorskip("cp_copyengine")
    pytest.importorskip("pp_rdma")
    pytest.importorskip("ep_engram")
    run_ranks(world, _delegation_worker, timeout_s=120)
