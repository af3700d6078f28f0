"""ep_jit.memcpy: argument checks (CPU) and batched / per-copy device copies (GPU)."""

from __future__ import annotations

import pytest
import torch

from ep_jit.memcpy import batch_copy_supported, memcpy_batch


def test_empty_and_zero_byte_copies_enqueue_nothing() -> None:
    assert memcpy_batch([]) == "none"
    assert memcpy_batch([(0, 0, 0), (1, 2, 0)]) == "none"


@pytest.mark.parametrize(
    ("copies", "match"),
    [([(1, 2)], "must be"), ([(16, 32, -1)], "negative"), ([(0, 32, 8)], "null address")],
)
def test_bad_copies_raise(copies: list[tuple[int, ...]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        memcpy_batch(copies)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("batched", [None, False, True])
def test_copies_land(batched: bool | None) -> None:
    if batched is True and not batch_copy_supported():
        pytest.skip("no cuMemcpyBatchAsync here")
    src = torch.arange(4096, dtype=torch.int32, device="cuda")
    dst = torch.full((3, 4096), -1, dtype=torch.int32, device="cuda")
    nbytes = src.numel() * 4
    copies = [(dst[i].data_ptr(), src.data_ptr(), nbytes - 4 * i) for i in range(3)]
    if batched is None:
        # The default stream never takes a batch: the driver refuses it there.
        assert memcpy_batch(copies) == "loop"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        how = memcpy_batch(copies, batched=batched)
    assert how == ("batch" if batched is not False and batch_copy_supported() else "loop")
    torch.cuda.synchronize()
    for i in range(3):
        assert torch.equal(dst[i, : 4096 - i], src[: 4096 - i])
        assert bool((dst[i, 4096 - i :] == -1).all())
