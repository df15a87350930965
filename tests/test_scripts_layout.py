"""The training scripts import their shared code from an importable module (scripts/diffusion_training.py), from
any working directory, and not from each other: train_tiny_lcm.py no longer needs train_tiny_sd.py on sys.path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_tiny_lcm_imports_from_anywhere_without_train_tiny_sd(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import scripts.train_tiny_lcm as m; "
            "print('scripts.train_tiny_sd' in sys.modules, m.save_ckpt.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "scripts.diffusion_training"]


def test_each_benchmark_uses_the_one_stage_timer():
    sources = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "scripts").rglob("*.py")}
    assert [name for name, text in sources.items() if "class StageTimer" in text] == ["machine.py"]
