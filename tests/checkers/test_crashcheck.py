"""Fast subset of the crash-state checker (`make crashcheck` runs the whole enumeration).

The unit tests pin the trace parser and the persistence models; the strace tests record real
protocols and check the distinct crash states of the ``strict`` model at the widest windows (the
crash points just before each fsync; about 20 s a protocol here),
and show that the checker catches a known bug put back (publish without its directory fsync).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from ckptdb.testing import crashcheck
from ckptdb.testing.crashcheck import Op, Tree, build, crash_states, parse_trace

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


def _hex(s: str) -> str:
    return "".join(f"\\x{b:02x}" for b in s.encode())


def test_parse_trace_resolves_paths_offsets_and_threads(tmp_path: Path) -> None:
    root = tmp_path / "r"
    base = Tree({"d": 1}, {1: None})
    d, f = f"{root}/d", f"{root}/d/f"
    text = "\n".join(
        [
            f'10 mkdirat(AT_FDCWD<{_hex("/")}>, "{_hex(d + "/t")}", 0777) = 0',
            f'10 openat(AT_FDCWD<{_hex("/")}>, "{_hex(f)}", O_WRONLY|O_CREAT|O_TRUNC, 0644) = 3<{_hex(f)}>',
            f'11 write(3<{_hex(f)}>, "{_hex("ab")}", 2 <unfinished ...>',
            f"10 fsync(4<{_hex(d)}> <unfinished ...>",
            "11 <... write resumed>) = 2",
            "10 <... fsync resumed>) = 0",
            f'10 write(3<{_hex(f)}>, "{_hex("cd")}", 2) = 2',
            f'10 pwrite64(3<{_hex(f)}>, "{_hex("Z")}", 1, 0) = 1',
            f'10 write(1<{_hex("/tmp/elsewhere.log")}>, "{_hex("x")}", 1) = 1',
            f'10 renameat2(AT_FDCWD<{_hex(d)}>, "{_hex("f")}", AT_FDCWD<{_hex(d)}>, "{_hex("t/g")}", '
            "RENAME_NOREPLACE) = 0",
            f'10 unlinkat(5<{_hex(d)}>, "{_hex("t")}", AT_REMOVEDIR) = -1 ENOTEMPTY (Directory not empty)',
            "10 +++ exited with 0 +++",
        ]
    )
    ops, outside, _, ack = parse_trace(text, root, base)
    assert ack is None
    assert [o.kind for o in ops] == ["mkdir", "creat", "write", "fsync", "write", "write", "rename"]
    assert [(o.off, o.data) for o in ops if o.kind == "write"] == [(0, b"ab"), (2, b"cd"), (0, b"Z")]
    assert ops[3].ino == 1 and ops[6].path2 == "d/t/g" and ops[6].ino == ops[1].ino
    assert outside == ["write /tmp/elsewhere.log"]
    tree = build(base, ops, crashcheck.CrashState(len(ops), frozenset(range(len(ops)))))
    assert bytes(tree.content[tree.entries["d/t/g"]] or b"") == b"Zbcd"


def _rename_trace() -> tuple[Tree, list[Op]]:
    base = Tree({"d": 1, "d/a.tmp": 2}, {1: None, 2: bytearray(b"new")})
    ops = [
        Op(0, "write", ino=2, off=3, data=b"!"),
        Op(1, "fsync", ino=2, syscall="fsync"),
        Op(2, "rename", path="d/a.tmp", path2="d/a", ino=2, parents=(1,)),
        Op(3, "creat", path="d/log", ino=3, parents=(1,)),
        Op(4, "fsync", ino=1, syscall="fsync"),
    ]
    return base, ops


def _names(base: Tree, ops: list[Op], model: str, prefix: int) -> set[frozenset[str]]:
    return {frozenset(build(base, ops, st).entries) for st in crash_states(ops, model) if st.prefix == prefix}


def test_rename_without_directory_fsync_may_be_undone() -> None:
    base, ops = _rename_trace()
    for model in ("ext4", "strict"):
        states = _names(base, ops, model, 4)  # crash before the directory fsync
        assert frozenset({"d", "d/a.tmp"}) in states  # the rename undone
        assert frozenset({"d", "d/a", "d/log"}) in states
        assert _names(base, ops, model, 5) == {frozenset({"d", "d/a", "d/log"})}  # after it: durable


def test_ext4_metadata_persists_in_order_strict_does_not() -> None:
    base, ops = _rename_trace()
    later_without_earlier = frozenset({"d", "d/a.tmp", "d/log"})  # creat persisted, rename lost
    assert later_without_earlier not in _names(base, ops, "ext4", 4)
    assert later_without_earlier in _names(base, ops, "strict", 4)


def test_unsynced_data_may_be_absent_truncated_or_torn() -> None:
    base = Tree({"f": 1}, {1: bytearray()})
    ops = [Op(0, "write", ino=1, off=0, data=b"abcd"), Op(1, "write", ino=1, off=4, data=b"efgh")]
    contents = {bytes(build(base, ops, st).content[1] or b"") for st in crash_states(ops, "ext4")}
    assert {b"", b"abcd", b"ab", b"abcdef", b"abcdefgh", b"\0\0\0\0efgh"} <= contents


def _run(protocol: str, tmp_path: Path, model: str = "strict") -> crashcheck.Result:
    logging.getLogger("ckptdb").setLevel(logging.ERROR)
    try:
        [res] = crashcheck.run_protocol(protocol, tmp_path, (model,), widest_only=True, log=lambda *_: None)
    finally:
        logging.getLogger("ckptdb").setLevel(logging.NOTSET)
    return res


@needs_strace
@pytest.mark.parametrize("protocol", ["save", "delete"])
def test_protocol_survives_the_widest_strict_crash_states(protocol: str, tmp_path: Path) -> None:
    res = _run(protocol, tmp_path)
    assert res.ops > 20 and res.states > 10
    assert res.violations == [] and res.outside == []


@needs_strace
def test_checker_catches_publish_without_directory_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTDB_CRASH_MUTANT", "no_publish_fsync")
    res = _run("save", tmp_path)
    assert any("committed step 3" in v and "missing" in v for v in res.violations), res.violations[:3]
    assert os.environ["CKPTDB_CRASH_MUTANT"]  # (the child inherited it)


# -- regressions for what the checker found ----------------------------------------------------


@pytest.mark.parametrize("token_file", ["torn", "zeros", "empty"])
def test_recovery_removes_a_dead_writers_tmp_dir_whose_token_file_a_power_loss_tore(
    tmp_path: Path, token_file: str
) -> None:
    """Power loss between the token file's write and its fsync: the file is torn (half of the
    token), a hole (zeros) or empty. Recovery used to call the directory foreign and leave it
    forever; the directory's name (only its writer makes ``step_N.tmp-<token>``) decides."""
    import subprocess
    import sys

    from ckptdb import FileCheckpointManager
    from ckptdb.testing import crash_protocols

    root = tmp_path / "root"
    crash_protocols.setup("save", root)
    subprocess.run(
        [sys.executable, "-m", "ckptdb.testing.crash_protocols", "stage", "dead_writer", str(root)], check=False
    )
    d = crash_protocols.ckpt_dir(root)
    [tmp] = list(d.glob("step_5.tmp-*"))
    token = (tmp / ".ckptdb_token").read_text().strip()
    torn = {"torn": token[: len(token) // 2], "zeros": "\0" * 17, "empty": ""}[token_file]
    (tmp / ".ckptdb_token").write_text(torn)
    with FileCheckpointManager(d) as m:
        assert m.last_recovery is not None and tmp.name in m.last_recovery.removed
        assert [c.state for c in m.catalog.checkpoints(m.run.id, step_nr=5)] == ["aborted"]
        assert m.get_step_numbers() == [1, 2]
    assert not tmp.exists() and (d / "step_99").is_dir()
