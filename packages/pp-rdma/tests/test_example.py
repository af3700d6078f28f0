"""examples/pipeline_1f1b.py under torchrun on 4 CPU ranks matches a single-process run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pipeline_1f1b.py"


def test_pipeline_1f1b_matches_single_process() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    # The reference backend. The default group used to outlive destroy_process_group in every
    # run (torch.distributed.nn's default arguments held it: that module was first imported
    # after init_process_group, by the first optimizer through torch._dynamo), so gloo tore it
    # down during interpreter shutdown, at a different moment on every rank; a rank was seen to
    # abort at exit then ("terminate called without an active exception", a few runs in a
    # hundred under heavy load). The example now exits non-zero when the group outlives it.
    cmd += [str(EXAMPLE), "--cpu", "--steps", "2", "--backend", "torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pipeline_1f1b: OK" in proc.stdout
    assert "still referenced after destroy_process_group" not in proc.stderr
