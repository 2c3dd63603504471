"""Packaging: `python -m build` makes an sdist and a wheel; the wheel installs into a clean
virtual environment with no framework; the adapters then name the extra to install; the
extras resolve.

Slow (a build, a fresh venv, pip resolutions against the package index): marked ``slow``, and
run by ``make test``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gradtail_ops", "gradtail_torch", "gradtail_optax", "gradtail_keras"}
ADAPTERS = {"gradtail_torch": "torch", "gradtail_optax": "optax", "gradtail_keras": "keras"}
FRAMEWORKS = ("torch", "jax", "jaxlib", "optax", "keras", "tensorflow", "cupy")

pytestmark = pytest.mark.slow


def source_version() -> str:
    """The version as written in gradtail_ops/__init__.py (read as text, not imported)."""
    text = (ROOT / "gradtail_ops" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, flags=re.MULTILINE)
    assert match, "gradtail_ops/__init__.py must set __version__ = '...' on one line"
    return match.group(1)


def run(*args: str | Path, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def project_files() -> list[str]:
    """Tracked files and untracked files git does not ignore: what a fresh clone would hold."""
    if not (ROOT / ".git").exists():  # a source tree without git (e.g. an unpacked sdist)
        return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()]
    out = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
    return [line for line in out.splitlines() if line and (ROOT / line).is_file()]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdist and wheel built by `python -m build` from a copy of the project (the wheel is
    built from the sdist, so a file missing from the sdist breaks the wheel)."""
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    for rel in project_files():
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    out = base / "dist"
    # --no-isolation: build with this environment's setuptools, so no network is needed here.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "base": base}


def test_wheel_and_sdist_contents(dists: dict[str, Path]) -> None:
    version = source_version()
    wheel, sdist = dists["wheel"], dists["sdist"]
    assert wheel.name == f"gradtail-{version}-py3-none-any.whl"
    assert sdist.name == f"gradtail-{version}.tar.gz"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"gradtail-{version}.dist-info"
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    top = {n.split("/")[0] for n in names if not n.startswith(info)}
    assert top == PACKAGES, top  # never a top-level `adapters`, `tests` or `benchmarks`
    for package in PACKAGES:
        assert f"{package}/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert metadata["Name"] == "gradtail"
    assert metadata["Version"] == version
    assert metadata["License-Expression"] == "Apache-2.0"
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"torch", "jax", "optax", "keras", "cupy", "all", "test", "docs", "lint"} <= extras
    assert {"lightning", "transformers", "flax"} <= extras
    requires = metadata.get_all("Requires-Dist")
    assert any(r.replace(" ", "").startswith("torch==2.13.0;") for r in requires), requires
    assert not [r for r in requires if "extra" not in r and r.split()[0].lower().startswith(FRAMEWORKS)]
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml", "gradtail_ops/__init__.py"} <= members
    assert {"adapters/gradtail_torch/__init__.py", "adapters/gradtail_optax/__init__.py"} <= members


CHECK_CLEAN_INSTALL = r"""
import importlib, json, sys
import numpy as np
import gradtail_ops

result = {"version": gradtail_ops.__version__, "frameworks": [], "adapters": {}}
# The core works with NumPy alone: the alignment of two gradients against a reference.
g = np.array([[1.0, 0.0], [0.0, 2.0]])
result["alignment"] = gradtail_ops.alignment(g, np.array([1.0, 1.0])).tolist()
for name in FRAMEWORKS:
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    result["frameworks"].append(name)
for name in ADAPTERS:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        result["adapters"][name] = str(exc)
    else:
        result["adapters"][name] = None
print(json.dumps(result))
"""


def test_wheel_installs_into_a_clean_venv(dists: dict[str, Path]) -> None:
    venv = dists["base"] / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", dists["wheel"])
    code = f"FRAMEWORKS = {FRAMEWORKS!r}\nADAPTERS = {sorted(ADAPTERS)!r}\n{CHECK_CLEAN_INSTALL}"
    out = run(python, "-c", code, cwd=dists["base"]).stdout  # cwd outside the source tree
    result = json.loads(out.strip().splitlines()[-1])
    assert result["version"] == source_version()
    assert result["frameworks"] == [], "the core must install no framework"
    # Independent reference: cos(g_i, G) by hand, G = (1, 1).
    assert result["alignment"] == pytest.approx([1 / 2**0.5, 2 / (2 * 2**0.5)])
    for module, extra in ADAPTERS.items():
        message = result["adapters"][module]
        assert message is not None, f"{module} imported without its framework"
        assert f"pip install 'gradtail[{extra}]'" in message, message

    # Then with the [torch] extra only: torch and its requirements, linked from this environment
    # (a fresh torch install would take a minute), and nothing else.
    linked = dists["base"] / "torch-extra"
    for top in distribution_closure("torch"):
        (linked / top.name).parent.mkdir(parents=True, exist_ok=True)
        (linked / top.name).symlink_to(top)
    (site_packages(python) / "torch_extra.pth").write_text(f"{linked}\n")
    out = run(python, "-c", CHECK_TORCH_EXTRA, cwd=dists["base"]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["scores"] == [6], result
    assert result["loaded"] == [], "import gradtail_torch must not import lightning or transformers"
    assert "pip install 'gradtail[lightning]'" in result["lightning"]
    assert "pip install 'gradtail[transformers]'" in result["hf"]


CHECK_TORCH_EXTRA = r"""
import json, sys
import torch
from gradtail_torch import score_dataset

model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))), (torch.randn(2, 3), torch.randint(0, 2, (2,)))]
scores = score_dataset(model, data, lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="none"))
result = {"scores": list(scores.shape), "loaded": sorted({"lightning", "transformers"} & set(sys.modules))}
for name in ("lightning", "hf"):
    try:
        __import__(f"gradtail_torch.{name}")
    except ImportError as exc:
        result[name] = str(exc)
    else:
        result[name] = ""
print(json.dumps(result))
"""


def site_packages(python: Path) -> Path:
    out = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout
    return Path(out.strip())


def distribution_closure(name: str) -> list[Path]:
    """Top-level files and folders of a distribution and of everything it requires (no extras),
    as installed in this environment."""
    from importlib import metadata

    seen: set[str] = set()
    tops: dict[str, Path] = {}
    todo = [name]
    while todo:
        dist_name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if dist_name in seen:
            continue
        seen.add(dist_name)
        dist = metadata.distribution(dist_name)
        for f in dist.files or []:
            if f.parts and f.parts[0] not in ("..", "__pycache__") and not f.parts[0].endswith(".pth"):
                tops[f.parts[0]] = Path(str(dist.locate_file(f.parts[0])))
        for req in dist.requires or []:
            if "extra ==" in req or "extra==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return sorted(set(tops.values()))


# The lightning, transformers and flax extras resolve as part of [all] (each on its own costs
# 10-15 s of resolution).
@pytest.mark.parametrize("extra", ["torch", "jax", "optax", "keras", "cupy", "all"])
def test_extras_resolve(dists: dict[str, Path], extra: str, tmp_path: Path) -> None:
    """pip resolves each extra (metadata only: `--dry-run`, nothing is downloaded or installed)."""
    report = tmp_path / "report.json"
    run(
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--disable-pip-version-check", "--report", report, f"gradtail[{extra}] @ {dists['wheel'].as_uri()}",
    )  # fmt: skip
    resolved = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert resolved["gradtail"] == source_version()
    expected = {
        "torch": {"torch"},
        "jax": {"jax", "jaxlib"},
        "optax": {"jax", "optax"},
        "keras": {"keras"},
        "cupy": {"cupy-cuda12x"},
        "all": {"torch", "jax", "optax", "keras", "pytest", "mkdocs", "ruff", "mypy"}
        | {"lightning", "transformers", "accelerate", "flax"},
    }[extra]
    assert expected <= set(resolved), sorted(resolved)
    if "torch" in resolved:
        assert resolved["torch"].split("+")[0] == "2.13.0", resolved["torch"]  # the pin
