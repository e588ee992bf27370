"""gradstab installs and works without the book: its wheel, its metadata and a run without the book's extras."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "sklearn", "ipywidgets", "IPython", "tqdm")


def test_wheel_ships_types_license_and_only_core_dependencies(tmp_path):
    source = tmp_path / "source"  # a copy, so that setuptools' build/ folder lands outside the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("gradstab-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "gradstab/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    core = [r for r in required if "extra ==" not in r]
    assert core == ["torch>=2.3", "numpy>=1.22"]
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra")}
    assert extras == {"plots", "digits", "widgets", "progress", "dask", "book"}


def test_trains_without_the_book_extras():
    """With matplotlib, scikit-learn, ipywidgets, IPython and tqdm unimportable, a practitioner's run still works."""
    code = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # import of a blocked module raises ImportError
import torch
from torch import nn
import gradstab as gs
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(96, 5, generator=gen), torch.randint(0, 3, (96,), generator=gen)
model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
h = gs.train(model, gs.Split(x[:64], y[:64], x[64:], y[64:]), lr=0.1, steps=20, batch_size=16)
print(h.steps, h.diverged, len(gs.GradientMonitor(model).names))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["20", "False", "2"]
