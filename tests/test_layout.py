"""The package's shape (issue 11): the augmentation side never pulls in training code, and no module grows past
~400 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_augmentation_side_imports_no_training_code():
    code = ("import sys, sip.augment.run, sip.augment.filter, sip.transforms, sip.data.bank, sip.data.mixing; "
            "print(sorted(m for m in sys.modules if m.startswith(('sip.train', 'sip.distill'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_is_over_about_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for folder in ("sip", "scripts") for p in (ROOT / folder).rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}
