"""Packs the parts of a nixl-cu13 wheel that pp-rdma uses into one small tar.xz.

    python tools/nixl_bundle.py WHEEL OUT.tar.xz

The wheel holds about 240 MB of libraries, most for NIXL plugins pp-rdma never loads (object
stores, GPUDirect Storage, DOCA, libfabric) and a second package (nixl_ep). The bundle keeps the
Python package, the UCX and POSIX plugins, UCX's own modules and every library they need
(followed through the ELF NEEDED entries), about 45 MB unpacked and under 4 MB packed. It serves
machines where the wheel cannot be installed from an index and must travel with the checkout
(`tools/gpu_harness.sh` unpacks it): unpack with `tar -xJf OUT.tar.xz -C DIR` and put DIR on
PYTHONPATH.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Plugins pp-rdma loads: UCX (transfers), POSIX (NIXL loads it by default; small).
KEEP_PLUGINS = ("UCX", "POSIX")


def _needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.*)\]", out)


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def trim(root: Path) -> None:
    """Removes what pp-rdma does not load from an unpacked wheel at ``root``."""
    for top in ("nixl_ep_cu13", "nixl_cu13.scripts"):
        for p in sorted((root / top).rglob("*"), reverse=True) if (root / top).exists() else ():
            p.unlink() if p.is_file() else p.rmdir()
        if (root / top).exists():
            (root / top).rmdir()
    libs = [p for p in root.rglob("*.so*") if p.is_file() and _is_elf(p)]
    by_name = {p.name: p for p in libs}

    def is_root(p: Path) -> bool:
        parts = p.relative_to(root).parts
        if parts[0] == "nixl_cu13":
            return True  # the Python extension modules
        if "ucx" in parts:
            return "perftest" not in p.name  # UCX's transport modules (loaded by name)
        if "plugins" in parts or parts[-2:-1] == ("nixl",):
            return any(p.name == f"libplugin_{k}.so" for k in KEEP_PLUGINS)
        return False

    keep: set[Path] = set()
    stack = [p for p in libs if is_root(p)]
    while stack:
        p = stack.pop()
        if p in keep:
            continue
        keep.add(p)
        stack.extend(by_name[n] for n in _needed(p) if n in by_name)
    for p in libs:
        if p not in keep:
            p.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(args.wheel) as z:
            z.extractall(root)
        for p in root.rglob("*"):  # zipfile drops the mode bits; shared objects need +x
            if p.is_file() and p.suffix != ".py":
                p.chmod(0o755)
        trim(root)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        with tarfile.open(args.out, "w:xz") as tar:
            for p in sorted(root.iterdir()):
                tar.add(p, arcname=p.name)
    packed = args.out.stat().st_size
    print(f"{args.out}: {size / 1e6:.1f} MB unpacked, {packed / 1e6:.1f} MB packed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
