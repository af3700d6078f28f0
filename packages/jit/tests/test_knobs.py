from __future__ import annotations

import os
from pathlib import Path

import pytest

from ep_jit import knobs
from ep_jit.knobs import EnvKnob, KnobGroup, knob_bool, knob_choice, knob_int, knob_str

EXPECTED = {
    "EP_JIT_CACHE_DIR",
    "EP_JIT_DEBUG",
    "EP_JIT_PRINT_COMPILER_COMMAND",
    "EP_JIT_PTXAS_VERBOSE",
    "EP_JIT_PTXAS_CHECK",
    "EP_JIT_WITH_LINEINFO",
    "EP_JIT_DUMP_PTX",
    "EP_JIT_DUMP_SASS",
    "EP_JIT_NVCC_COMPILER",
    "EP_JIT_COMPILER",
    "EP_JIT_ARCH",
}


class _DemoKnobs(KnobGroup):
    flag = knob_bool("EP_JITTEST_FLAG", False, "A demo flag.")
    count = knob_int("EP_JITTEST_COUNT", 3, "A demo count.")
    mode = knob_choice("EP_JITTEST_MODE", "a", ("a", "b"), "A demo choice.")
    name = knob_str("EP_JITTEST_NAME", lambda: "computed", "A demo string.", default_doc="computed")


demo = _DemoKnobs()


@pytest.fixture(autouse=True)
def _restore_env() -> object:
    with knobs.jit.scope(), demo.scope():
        yield None


def test_every_variable_is_declared_and_documented() -> None:
    rows = {r.name: r for r in knobs.describe(owner="ep_jit")}
    assert set(rows) >= EXPECTED
    for name in EXPECTED:
        assert rows[name].doc
        assert rows[name].type
    table = knobs.markdown_table("ep_jit")
    assert "| `EP_JIT_COMPILER` | nvrtc\\|nvcc | `'nvrtc'` |" in table


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in EXPECTED | {"XDG_CACHE_HOME"}:
        monkeypatch.delenv(name, raising=False)
    assert knobs.jit.debug is False
    assert knobs.jit.ptxas_check is False
    assert knobs.jit.compiler == "nvrtc"
    assert knobs.jit.arch is None
    assert knobs.jit.nvcc_compiler is None
    assert knobs.jit.cache_dir == str(Path.home() / ".cache" / "ep-jit")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert knobs.jit.cache_dir == "/xdg/ep-jit"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("off", False),
        ("", False),
        ("False", False),
    ],
)
def test_bool_parsing(monkeypatch: pytest.MonkeyPatch, raw: str, value: bool) -> None:
    monkeypatch.setenv("EP_JIT_DEBUG", raw)
    assert knobs.jit.debug is value


def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EP_JIT_DEBUG", "maybe")
    with pytest.raises(ValueError, match="EP_JIT_DEBUG"):
        _ = knobs.jit.debug
    monkeypatch.setenv("EP_JIT_COMPILER", "clang")
    with pytest.raises(ValueError, match="EP_JIT_COMPILER"):
        _ = knobs.jit.compiler
    monkeypatch.setenv("EP_JITTEST_COUNT", "three")
    with pytest.raises(ValueError, match="EP_JITTEST_COUNT"):
        _ = demo.count


def test_read_at_access_time_and_assignment_sets_environ() -> None:
    assert demo.count == 3
    os.environ["EP_JITTEST_COUNT"] = "0x10"
    assert demo.count == 16
    demo.flag = True
    assert os.environ["EP_JITTEST_FLAG"] == "1"
    assert demo.flag is True
    demo.flag = None
    assert "EP_JITTEST_FLAG" not in os.environ
    assert demo.name == "computed"
    demo.mode = "b"
    assert demo.mode == "b"


def test_scope_restores() -> None:
    os.environ.pop("EP_JITTEST_MODE", None)
    os.environ["EP_JITTEST_NAME"] = "before"
    with demo.scope():
        demo.mode = "b"
        demo.name = "inside"
    assert "EP_JITTEST_MODE" not in os.environ
    assert os.environ["EP_JITTEST_NAME"] == "before"


def test_registry_is_shared_and_rejects_conflicts() -> None:
    rows = {r.name: r for r in knobs.describe()}
    assert rows["EP_JITTEST_COUNT"].owner == __name__.split(".")[0]
    assert isinstance(_DemoKnobs.count, EnvKnob)
    assert [k.name for k in _DemoKnobs.knobs()][:2] == ["EP_JITTEST_FLAG", "EP_JITTEST_COUNT"]
    with pytest.raises(ValueError, match="declared twice"):
        knob_int("EP_JITTEST_COUNT", 3, "Another meaning.")
    with pytest.raises(ValueError, match="upper-case"):
        knob_int("ep_lower", 1, "Bad name.")
    with pytest.raises(ValueError, match="not one of"):
        knob_choice("EP_JITTEST_BADCHOICE", "z", ("a",), "Bad default.")


def test_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert knobs.torchrun_env() is None
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        knobs.torchrun_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    env = knobs.torchrun_env()
    assert env is not None
    assert (env.rank, env.world_size, env.local_rank, env.node_rank) == (5, 8, 1, 1)
    monkeypatch.setenv("GROUP_RANK", "7")
    monkeypatch.setenv("LOCAL_RANK", "3")
    env = knobs.torchrun_env()
    assert env is not None
    assert (env.local_rank, env.node_rank, env.master_port) == (3, 7, 29500)


def test_readme_table_is_current() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("-->\n", readme.index("<!-- knobs table")) + 4
    end = readme.index("\n<!-- end knobs table -->")
    assert readme[start:end] == knobs.markdown_table("ep_jit"), (
        "regenerate the README table with ep_jit.knobs.markdown_table('ep_jit')"
    )
