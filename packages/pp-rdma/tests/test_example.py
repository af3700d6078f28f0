"""examples/pipeline_1f1b.py under torchrun on 4 CPU ranks matches a single-process run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pipeline_1f1b.py"


def test_pipeline_1f1b_matches_single_process() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    # The reference backend. A rank (not rank 0) was seen to abort at exit after a correct run
    # ("terminate called without an active exception", a few runs in a hundred under heavy
    # load, with this backend too, so not NIXL's); the example now leaves through a barrier and
    # the reference backend completes its send handles at destroy. The cause is not proven.
    cmd += [str(EXAMPLE), "--cpu", "--steps", "2", "--backend", "torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pipeline_1f1b: OK" in proc.stdout
