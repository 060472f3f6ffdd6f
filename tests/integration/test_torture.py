"""A short crash torture (scripts/torture.py): a writer SIGKILLed at random points, invariants checked
after every kill. The full run (200+ kills per backend) is reported in docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "torture.py"


@pytest.mark.slow
def test_torture_small(tmp_path: Path, catalog_url: str) -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", "12", "--dir", str(tmp_path / "ckpt"), "--url", catalog_url],
        capture_output=True,
        text=True,
        timeout=280,
    )
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and summary["violations"] == 0, r.stdout + r.stderr
    assert summary["kills"] == 12 and summary["early_exits"] == 0


@pytest.mark.slow
def test_torture_small_on_s3(tmp_path: Path, catalog_url: str) -> None:
    """The same on an s3:// run (SeaweedFS, started by the script): no prefix of a dead attempt and no
    incomplete multipart upload survives recovery. `make torture-s3` runs 100 kills."""
    cmd = [sys.executable, str(SCRIPT), "--kills", "8", "--max-delay", "3", "--dir", str(tmp_path / "ckpt")]
    r = subprocess.run([*cmd, "--url", catalog_url, "--s3", "seaweedfs"], capture_output=True, text=True, timeout=280)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and summary["violations"] == 0, r.stdout + r.stderr
    assert summary["kills"] == 8 and summary["early_exits"] == 0 and summary["store"] == "seaweedfs"
