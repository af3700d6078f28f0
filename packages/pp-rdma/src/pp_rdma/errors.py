"""Exceptions of pp-rdma: every one names the peer rank and the message's sequence number.

Sequence numbers count the messages of one directed pair from 1: send #3 to rank 2 is this
rank's third ``send(..., dst=2)``, and it is rank 2's third ``recv(..., src=<this rank>)``.
"""

from __future__ import annotations

from ep_jit.errors import HostTimeoutError

__all__ = ["PipeError", "PipePeerError", "PipeSizeMismatchError", "PipeTimeoutError"]


class PipeError(RuntimeError):
    """Base class of the failures of a transfer.

    Attributes:
        op: ``"send"`` or ``"recv"``.
        peer: The other rank of the pair (rank in the buffer's group).
        seq: Sequence number of the message in that directed pair (from 1).
    """

    def __init__(self, op: str, peer: int, seq: int, detail: str) -> None:
        """Builds ``"<op> #<seq> <to|from> rank <peer>: <detail>"``."""
        self.op = op
        self.peer = peer
        self.seq = seq
        way = "to" if op == "send" else "from"
        RuntimeError.__init__(self, f"{op} #{seq} {way} rank {peer}: {detail}")


class PipeTimeoutError(PipeError, HostTimeoutError):
    """A send blocked on credits or a recv waiting for data passed the buffer's timeout.

    Attributes:
        op, peer, seq: As for :class:`PipeError`.
        what, timeout_s: As for :class:`ep_jit.HostTimeoutError`.
    """

    def __init__(self, op: str, peer: int, seq: int, detail: str, timeout_s: float) -> None:
        """Names the pair, what was waited for and the limit."""
        self.what = detail
        self.timeout_s = timeout_s
        PipeError.__init__(self, op, peer, seq, f"timed out after {timeout_s:g} s: {detail}")


class PipePeerError(PipeError):
    """The transport reported the peer gone (its process died or closed its connections)."""


class PipeSizeMismatchError(PipeError, ValueError):
    """The byte size of a send and of its matching recv differ; no data was delivered.

    Attributes:
        sent_nbytes: Bytes the sender sent (``-1`` when not known here).
        expected_nbytes: Bytes of the receiver's ``out`` (``-1`` when not known here).
    """

    def __init__(self, op: str, peer: int, seq: int, sent: int, expected: int) -> None:
        """Names both sizes."""
        self.sent_nbytes = sent
        self.expected_nbytes = expected
        PipeError.__init__(
            self,
            op,
            peer,
            seq,
            f"the send carries {sent} bytes but the recv's output holds {expected} bytes "
            "(recv(out, src) needs out.nbytes equal to the sent tensor's nbytes)",
        )
