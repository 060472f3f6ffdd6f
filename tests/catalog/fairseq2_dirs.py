"""Checkpoint directories laid out exactly as fairseq2 writes them (no fairseq2 needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

CARD = {"name": "checkpoint", "model_family": "toy", "model_config": {"dim": 4}}


def model_sd(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"proj.weight": torch.randn(4, 4, generator=g), "proj.bias": torch.randn(4, generator=g)}


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def v03(d: Path, steps: dict[int, float | None], *, tmp_step: int | None = None) -> Path:
    """fairseq2 v0.3/0.4: step_N/{model.pt, rank_0.pt, score.txt}, model.yaml, a step_N.tmp leftover."""
    d.mkdir(parents=True)
    (d / "model.yaml").write_text(yaml.safe_dump(CARD))
    for step, score in steps.items():
        s = d / f"step_{step}"
        _save({"model": model_sd(step), "model_key": "model"}, s / "model.pt")
        _save({"optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}, "step_nr": step}, s / "rank_0.pt")
        _save({"data_epoch": step // 100, "config": {"lr": 0.01}}, s / "metadata.pt")
        if score is not None:
            (s / "score.txt").write_text(f"{score}\n")
    if tmp_step is not None:
        _save({"model": {}}, d / f"step_{tmp_step}.tmp" / "model.pt")
    return d


def head(d: Path, steps: dict[int, float | None], *, sdp: int = 1, tmp_step: int | None = None) -> Path:
    """fairseq2 0.5+: step_N/{model,optimizer}/pp_00/tp_00/sdp_XX.pt, trainer/, data_reader/, scores/step_N.txt."""
    d.mkdir(parents=True)
    (d / "model.yaml").write_text(yaml.safe_dump(CARD))
    for step, score in steps.items():
        s = d / f"step_{step}"
        sd = model_sd(step)
        for r in range(sdp):
            part = sd if sdp == 1 else {k: v.chunk(sdp)[r].clone() for k, v in sd.items()}
            _save(part, s / "model" / "pp_00" / "tp_00" / f"sdp_{r:02d}.pt")
            _save({"state": {}}, s / "optimizer" / "pp_00" / "tp_00" / f"sdp_{r:02d}.pt")
            _save({"step_nr": step}, s / "trainer" / f"rank_{r:02d}.pt")
        _save({"position": step * 8}, s / "data_reader" / "dp_00.pt")
        if score is not None:
            (d / "scores").mkdir(exist_ok=True)
            (d / "scores" / f"step_{step}.txt").write_text(f"{score}\n")
    if tmp_step is not None:
        _save({"x": 1}, d / f"step_{tmp_step}.tmp" / "trainer" / "rank_00.pt")
    return d


def snapshot(d: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file's size, mtime and content: proof that nothing was modified."""
    return {
        p.relative_to(d).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.name.startswith("catalog.db")
    }


def v03_fsdp(d: Path, steps: dict[int, float | None], *, dp: int = 2) -> Path:
    """fairseq2 v0.3/0.4.0 FSDP (model not replicated): every ``rank_<dp>.pt`` holds its model shard
    *and* ``"model_key": "model"``; ``model.pt`` is the consolidated model (save_consolidated_fsdp_model)."""
    d.mkdir(parents=True)
    (d / "model.yaml").write_text(yaml.safe_dump(CARD))
    for step, score in steps.items():
        s = d / f"step_{step}"
        sd = model_sd(step)
        for r in range(dp):
            shard = {k: v.chunk(dp)[r].clone() for k, v in sd.items()}
            _save(
                {"model": shard, "optimizer": {"state": {}}, "step_nr": step, "model_key": "model"}, s / f"rank_{r}.pt"
            )
        _save({"model": sd, "model_key": "model"}, s / "model.pt")
        if score is not None:
            (s / "score.txt").write_text(f"{score}\n")
    return d
