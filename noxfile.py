"""Task entry point of the monorepo: `nox -l` lists the sessions, plain `nox` runs the CI set.

    nox                      # what CI runs (.ci/run): lint, build, every test set, multinode,
                             # examples
    nox -s build             # a wheel and an sdist of every package into dist/
    nox -s "tests(ep-core)"  # one package alone, installed from dist/ with only what it declares
    nox -s tests_all         # every package in one environment
    nox -s multinode         # EP and pp-rdma on 2 simulated nodes x 2 ranks (two torchrun)
    nox -s examples          # every package's examples under torchrun on CPU ranks
    nox -s lint types        # ruff check + format; mypy over each src/
    nox -s env_docs          # docs/env-vars.md is up to date with the packages' knobs
    nox -s gpu               # GPU tests, serial; only on a machine with CUDA (not in the CI set)

Every environment installs the packages from the wheels in dist/, never from the source tree, so a
test run proves that the built wheel is complete and that its declared requirements suffice.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import nox
import nox.command

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

nox.needs_version = ">=2026.4.10"
# pip, not uv: the machines' pip configuration (a local CPU torch wheel, a version cap) applies.
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = [
    "lint", "types", "build", "env_docs", "tests", "tests_all", "multinode", "examples",
]  # fmt: skip

ROOT = Path(__file__).parent
DIST = ROOT / "dist"
REPORTS = ROOT / "build" / "test-reports"
# Pinned so that a plain `torch` requirement never drags in a multi-GB CUDA build on CPU machines;
# our CPU machines carry this wheel on local disk.
TORCH = "torch==2.13.0"
TEST_DEPS = ["pytest>=8.3", "pytest-xdist>=3.6", "pytest-timeout>=2.3"]
LINT_DEPS = ["ruff==0.17.6"]
TYPE_DEPS = ["mypy==2.4.1"]
PYTEST_TIMEOUT_S = 900  # per test; a hang fails the run instead of eating CI's 90 minutes


class Package:
    """One folder under packages/, read from its pyproject.toml."""

    def __init__(self, folder: Path) -> None:
        meta = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
        self.folder = folder.name
        self.dist: str = meta["name"]
        self.module = self.dist.replace("-", "_")
        self.requires: list[str] = meta.get("dependencies", [])
        self.extras: dict[str, list[str]] = meta.get("optional-dependencies", {})
        version_file = folder / "src" / self.module / "_version.py"
        match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", version_file.read_text())
        if match is None:
            raise RuntimeError(f"{version_file}: no __version__ = '...'")
        self.version = match.group(1)

    @property
    def with_extras(self) -> str:
        """The requirement that installs this package with every optional feature it declares."""
        return f"{self.dist}[{','.join(sorted(self.extras))}]" if self.extras else self.dist

    @property
    def tests(self) -> str:
        return f"packages/{self.folder}/tests"

    @property
    def src(self) -> str:
        return f"packages/{self.folder}/src/{self.module}"


def _discover() -> dict[str, Package]:
    """Every package under packages/, dependencies before their dependents."""
    found = [Package(p.parent) for p in sorted((ROOT / "packages").glob("*/pyproject.toml"))]
    names = {p.dist for p in found}
    ordered: dict[str, Package] = {}

    def visit(pkg: Package, path: tuple[str, ...]) -> None:
        if pkg.dist in path:
            raise RuntimeError(f"dependency cycle: {' -> '.join((*path, pkg.dist))}")
        if pkg.folder in ordered:
            return
        for dep in _requirement_names(pkg) & names:
            visit(next(p for p in found if p.dist == dep), (*path, pkg.dist))
        ordered[pkg.folder] = pkg

    for pkg in found:
        visit(pkg, ())
    return ordered


def _requirement_names(pkg: Package) -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(Requirement(line).name) for line in pkg.requires}


PACKAGES = _discover()
BY_DIST = {p.dist: p for p in PACKAGES.values()}
PKG = [nox.param(name, id=name, tags=[name]) for name in PACKAGES]


def _siblings(pkg: Package) -> list[tuple[Package, str]]:
    """In-repo requirements of `pkg` as (package, specifier string)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = []
    for line in pkg.requires:
        req = Requirement(line)
        if canonicalize_name(req.name) in BY_DIST:
            if req.url:
                raise ValueError(f"{pkg.dist}: sibling requirement {line!r} must be a range")
            out.append((BY_DIST[canonicalize_name(req.name)], str(req.specifier)))
    return out


def _check_siblings() -> None:
    """Every in-repo requirement is a range that the sibling's in-tree version satisfies."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    for pkg in PACKAGES.values():
        if Version(pkg.version).is_prerelease or Version(pkg.version).is_devrelease:
            raise ValueError(f"{pkg.dist}: in-tree version {pkg.version} must be a plain release")
        for dep, spec in _siblings(pkg):
            if not spec or "==" in spec:
                raise ValueError(f"{pkg.dist}: needs {dep.dist}{spec}; use a range, not a pin")
            if Version(dep.version) not in SpecifierSet(spec):
                raise ValueError(
                    f"{pkg.dist} needs {dep.dist}{spec} but the tree has {dep.dist} {dep.version}"
                )


def _install(session: nox.Session, names: list[str], *extra: str, with_extras: bool = True) -> None:
    """Install the named packages from dist/ (siblings they declare come along from dist/).

    With `with_extras`, each package comes with all the extras it declares (e.g. `plot`), since
    its tests cover those features too; `extra` are further requirements (torch, tools)
    installed first.
    """
    if not DIST.is_dir() or not any(DIST.glob("*.whl")):
        session.error("dist/ has no wheels: run `nox -s build` first")
    # Exact in-tree versions, so that pip takes our wheels and never a same-named index release.
    pins = Path(session.create_tmp()) / "siblings.txt"
    pins.write_text("".join(f"{p.dist}=={p.version}\n" for p in PACKAGES.values()))
    session.install(*extra, *TEST_DEPS)
    # A reused environment would keep an older build of the same version.
    session.run("python", "-m", "pip", "uninstall", "-q", "-y", *BY_DIST, silent=True)
    session.install(
        "--find-links",
        str(DIST),
        "-c",
        str(pins),
        *(BY_DIST[n].with_extras if with_extras else n for n in names),
    )
    # The tests must exercise the installed wheels, never packages/*/src.
    modules = [BY_DIST[n].module for n in names]
    check = (
        f"import {', '.join(modules)}\n"
        f"for m in ({', '.join(modules)},):\n"
        "    assert 'site-packages' in m.__file__, m.__file__\n"
        "    print(m.__name__, m.__version__, m.__file__)\n"
    )
    session.run("python", "-c", check)


def _pytest(session: nox.Session, paths: list[str], *args: str) -> None:
    """pytest from the repository root (root pytest.ini), with a JUnit report for .ci/run.

    Exit code 5 (nothing collected) fails the session: every package has CPU tests.
    """
    REPORTS.mkdir(parents=True, exist_ok=True)
    report = REPORTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", session.name).strip("_") + ".xml")
    session.run("python", "-m", "pytest", *paths, *args, f"--junitxml={report}", *session.posargs)


def _run_all(session: nox.Session, *commands: list[str]) -> None:
    """Run every command even when one fails, then fail naming the ones that did."""
    failed = []
    for command in commands:
        try:
            session.run(*command)
        except nox.command.CommandFailed:
            failed.append(" ".join(command))
    if failed:
        session.error(f"failed: {'; '.join(failed)}")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.install(*LINT_DEPS)
    _run_all(session, ["ruff", "check", "."], ["ruff", "format", "--check", "."])


@nox.session
def build(session: nox.Session) -> None:
    """A wheel and an sdist of every package into dist/ (the wheel is built from the sdist)."""
    _check_siblings()
    session.install("build>=1.2")
    shutil.rmtree(DIST, ignore_errors=True)
    for pkg in PACKAGES.values():
        session.run("python", "-m", "build", "--outdir", str(DIST), f"packages/{pkg.folder}")
    session.log("built: " + ", ".join(sorted(p.name for p in DIST.iterdir())))


# A fresh environment every time: nothing left over from an earlier run may stand in for a
# requirement the package forgot to declare.
@nox.session(requires=["build"], reuse_venv=False)
@nox.parametrize("pkg", PKG)
def tests(session: nox.Session, pkg: str) -> None:
    """CPU tests of one package, alone in an environment with what its wheel declares."""
    package = PACKAGES[pkg]
    _install(session, [package.dist], TORCH)
    _pytest(session, [package.tests], "-m", "not gpu", "-n", "2", f"--timeout={PYTEST_TIMEOUT_S}")


@nox.session(requires=["build"])
def tests_all(session: nox.Session) -> None:
    """CPU tests of every package, all installed into one environment."""
    _install(session, list(BY_DIST), TORCH)
    paths = [p.tests for p in PACKAGES.values()]
    _pytest(session, paths, "-m", "not gpu", "-n", "2", f"--timeout={PYTEST_TIMEOUT_S}")


@nox.session(requires=["build"])
def multinode(session: nox.Session) -> None:
    """2 simulated nodes x 2 ranks, two torchrun launchers, gloo on CPU: EP dispatch/combine
    (as `pip install ep-elastic`), then pp-rdma's PipeBuffer with NIXL between the nodes and the
    local path within them (as `pip install 'pp-rdma[rdma]'`).

    The nodes are separate launcher processes (`--node-rank 0/1`), so LOCAL_RANK/LOCAL_WORLD_SIZE
    differ from RANK/WORLD_SIZE and the code paths that tell local from remote ranks run.
    """
    _install(session, ["ep-elastic"], TORCH, with_extras=False)  # as `pip install ep-elastic`
    session.run(
        "python", "tools/run_multinode.py", "--nnodes", "2", "--nproc-per-node", "2",
        "--timeout", "600", "--", "tools/multinode_check.py", *session.posargs,
    )  # fmt: skip
    _install(session, ["pp-rdma"], TORCH)  # with its rdma extra: NIXL between the nodes
    session.run(
        "python", "tools/run_multinode.py", "--nnodes", "2", "--nproc-per-node", "2",
        "--timeout", "300", "--", "packages/pp-rdma/tools/multinode_check.py",
    )  # fmt: skip


# (package folder, script, ranks): every example of every package, started as its docstring says
# (`torchrun --nproc-per-node N script.py`); decode_cuda_graph.py only says that it needs CUDA.
EXAMPLES = [
    ("ep-elastic", "dispatch_combine.py", 2),
    ("ep-elastic", "dispatch_combine.py", 4),
    ("ep-elastic", "train_moe.py", 2),
    ("ep-elastic", "decode_cuda_graph.py", 2),
    ("cp-copyengine", "ring_attention.py", 2),
    ("engram", "engram_layer.py", 2),
    ("pp-rdma", "pipeline_1f1b.py", 4),
]
EXAMPLE_TIMEOUT_S = 120  # per run; each takes seconds


@nox.session(requires=["build"])
def examples(session: nox.Session) -> None:
    """Every package's examples on CPU ranks (gloo), the packages installed from their wheels.

    Each runs under torchrun through tools/run_multinode.py with one node (a free port, a
    timeout, every rank stopped when one fails), from the repository root so that nothing
    imports packages/*/src. An example checks its own result and exits non-zero on a mismatch.
    """
    _install(session, list(BY_DIST), TORCH, with_extras=False)
    listed = {(folder, name) for folder, name, _ in EXAMPLES}
    found = {(p.parent.parent.name, p.name) for p in Path("packages").glob("*/examples/*.py")}
    if found - listed:
        session.error(f"examples not run by this session: {sorted(found - listed)}")
    _run_all(
        session,
        *(_torchrun(Path("packages", f, "examples", n), ranks) for f, n, ranks in EXAMPLES),
    )


def _torchrun(script: Path, ranks: int) -> list[str]:
    """`torchrun --nproc-per-node <ranks> <script>` with a timeout, through run_multinode.py."""
    return [
        "python", "tools/run_multinode.py", "--nnodes", "1", "--nproc-per-node", str(ranks),
        "--timeout", str(EXAMPLE_TIMEOUT_S), "--", str(script),
    ]  # fmt: skip


@nox.session(requires=["build"])
def env_docs(session: nox.Session) -> None:
    """docs/env-vars.md matches the packages' knobs (regenerate: python tools/gen_env_docs.py)."""
    _install(session, list(BY_DIST), TORCH)
    session.run("python", "tools/gen_env_docs.py", "--check")


@nox.session(requires=["build"])
def types(session: nox.Session) -> None:
    """mypy over each package's src/, against the installed siblings and torch."""
    _install(session, list(BY_DIST), TORCH, *TYPE_DEPS)
    _run_all(session, *(["mypy", pkg.src] for pkg in PACKAGES.values()))


@nox.session(default=False, venv_params=["--system-site-packages"], requires=["build"])
def gpu(session: nox.Session) -> None:
    """GPU tests of every package, serially (a multigpu test takes every device).

    Uses the machine's own CUDA torch (system site-packages); run it only where CUDA is present.
    Machines without nox run tools/gpu_harness.sh instead.
    """
    _install(session, list(BY_DIST))
    paths = [p.tests for p in PACKAGES.values()]
    _pytest(session, paths, "-m", "gpu", "-p", "no:xdist", "-x")
