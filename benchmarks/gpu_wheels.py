"""The wheels the GPU check machine lacks, gathered here into `.gpu_wheels/` (ignored by git).

    .venv/bin/python benchmarks/gpu_wheels.py          # run here, where pip reaches the package index
    .venv/bin/python benchmarks/gpu_wheels.py --check  # only check the folder already there

The GPU check machine (../shared/docs/STACK_NOTES.md, "The GPU check machine") has python3 3.12
(x86_64, manylinux) with torch 2.11 (CUDA 13), transformers 5.17 and the packages of
`ON_THE_MACHINE`, and no network. What the project needs beyond those travels with the checkout:
the device tool carries an ignored folder named in `carry`, at most 64 MiB together with the
working tree. `benchmarks/gpu_check.sh` installs the folder there with
`pip install --no-index --no-deps --target`.

What this script does:

1. the closure of the project's dependencies (pyproject.toml), read from each wheel's own
   metadata with the markers of the machine (CPython 3.12, Linux x86_64), less what the machine
   has (`ON_THE_MACHINE`, but for three small pure-Python packages needed at recent versions,
   `CARRY_ANYWAY`) and what the check does not use (`NOT_NEEDED`);
2. each package at the version installed in the interpreter running this script (the .venv the
   tests pass with), else the newest that fits its requirement: a cp312 manylinux wheel from the
   index, or, for a project that publishes only a source distribution (deepspeed, rouge-score),
   a wheel built here, which must come out pure Python (py3-none-any);
3. two wheels slimmed (`SLIM`) so that the whole fits one call: ray without its Java jar (32 MB),
   RLlib, Ray LLM and the dashboard client's source maps; bitsandbytes with only its CUDA 13 and
   CPU libraries (the machine's torch is CUDA 13). The files removed leave the wheel's RECORD too;
   the rest, file modes included, is copied unchanged;
4. checks, written to `.gpu_wheels/manifest.json`: every requirement of every wheel (with the
   machine's markers) is met by a wheel in the folder or by a package of the machine (by the
   version the device notes saw there, where they give one; `gpu_check.sh` checks the others
   there, from this manifest), one version per package, and the folder plus the working tree
   that travels with it within the 64 MiB of one call.
"""

from __future__ import annotations

import argparse
import email.message
import email.parser
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".gpu_wheels"
CALL_LIMIT = 64 * 2 ** 20  # the device tool: working tree + carried paths, per call

PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]
MACHINE_TAGS = {*cpython_tags((3, 12), abis=["cp312"], platforms=PLATFORMS),
                *compatible_tags((3, 12), interpreter="cp312", platforms=PLATFORMS)}
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}

# The machine's packages as the device notes list them (KINDS.md, "Python packages already there",
# read on a machine of that image 2026-11-17), and the versions one session's `pip list` showed.
ON_THE_MACHINE = set(map(canonicalize_name, """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()))
MACHINE_VERSIONS = {canonicalize_name(k): v for k, v in {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0"}.items()}

# On the machine, at versions the notes do not give, while the wheels need recent ones (pydantic:
# typing-extensions>=4.16, ray: packaging>=24.2, google-api-core: requests>=2.33): pure Python, small and
# backward compatible, so they travel and come first on PYTHONPATH ("when unsure, carry the small wheel").
CARRY_ANYWAY = set(map(canonicalize_name, ["typing-extensions", "packaging", "requests"]))

# Dependencies the check never imports (each with why), left out of the folder with their own needs.
NOT_NEEDED = {
    "optuna": "dipo-scale sweep's optuna search only",
    "wandb": "the check runs with logging.wandb=disabled (its wheel carries a 20 MB binary)",
    "py-spy": "ray[default]: `ray stack` and the dashboard's profiler only",
    "virtualenv": "ray[default]: runtime environments with pip/virtualenv only",
    "smart-open": "ray[default]: cloud storage URIs only",
    "colorful": "ray[default]: coloured CLI output only",
    "tensorboardx": "ray[train,tune]: the TensorBoard logger callback only",
    # google-auth (opencensus -> google-api-core, Ray's metrics) needs it to sign service-account
    # credentials only; Ray's dashboard and metrics import without it (checked with it hidden)
    "cryptography": "google-auth's credential signing only (5 MB)",
}
NOT_NEEDED = {canonicalize_name(k): v for k, v in NOT_NEEDED.items()}


def _ray_unused(path: str) -> bool:
    return (path.startswith(("ray/jars/", "ray/rllib/", "ray/llm/"))  # Java workers, RLlib, Ray LLM
            or (path.startswith("ray/dashboard/client/build/") and path.endswith(".map")))  # web UI source maps


def _bitsandbytes_unused(path: str) -> bool:
    # libbitsandbytes_cuda118 ... cuda128, rocm*, xpu*: other CUDA versions and other vendors
    return re.fullmatch(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+|xpu\d+)\.so", path) is not None


SLIM = {"ray": _ray_unused, "bitsandbytes": _bitsandbytes_unused}


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def project_requirements() -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as z:
        member = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(member).decode())


def applies(req: Requirement, extras: set[str]) -> bool:
    """Whether `req` is needed on the machine when its package is installed with `extras`."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in (extras or {""}))


def wanted_version(req: Requirement) -> str | None:
    """The version installed here when it fits `req` (the one the tests pass with), else None."""
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if req.specifier.contains(version, prereleases=True) else None


def fetch(req: Requirement, version: str | None, into: Path) -> Path:
    """A cp312 manylinux wheel of `req` (at `version`, else the newest that fits) in `into`;
    built here from the source distribution when the project publishes no wheel."""
    spec = f"{req.name}=={version}" if version else f"{req.name}{req.specifier}"
    before = set(into.iterdir())
    got = pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
              "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
              *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(into), spec)
    if got.returncode != 0:  # no wheel for the machine: build one (pure Python, or refused)
        got = pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(into), spec)
        if got.returncode != 0:
            raise SystemExit(f"gpu_wheels: no wheel for {spec}, and building one failed:\n{got.stderr[-2000:]}")
        built = next(p for p in set(into.iterdir()) - before)
        if not built.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"gpu_wheels: {spec} built as {built.name}: not pure Python, cannot travel")
    new = set(into.iterdir()) - before
    if len(new) != 1:
        raise SystemExit(f"gpu_wheels: expected one wheel for {spec}, got {sorted(p.name for p in new)}")
    return new.pop()


def slim(src: Path, dst_dir: Path, unused) -> tuple[Path, int]:
    """`src` rewritten into `dst_dir` without the files `unused(path)` names (and their RECORD
    lines); returns (the wheel, bytes of files removed)."""
    dst = dst_dir / src.name
    removed = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            if unused(info.filename):
                removed += info.file_size
                continue
            data = zin.read(info)
            if info.filename == record:
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not unused(line.split(",", 1)[0])).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)  # `info` keeps the file mode
    return dst, removed


def gather(out: Path) -> dict:
    """The closure, fetched and slimmed into `out`; returns the manifest (without the checks)."""
    queue = [(r, set(r.extras)) for r in project_requirements()]
    chosen: dict[str, dict] = {}          # package -> {"version", "extras", "wheel"}
    machine: dict[str, list[str]] = {}    # package on the machine -> the requirements on it
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        while queue:
            req, extras = queue.pop(0)
            name = canonicalize_name(req.name)
            if name in ON_THE_MACHINE and name not in CARRY_ANYWAY:
                machine.setdefault(name, []).append(str(req.specifier))
                continue
            if name in NOT_NEEDED:
                skipped[name] = NOT_NEEDED[name]
                continue
            if name in chosen:  # seen: only new extras bring new requirements
                new_extras = extras - chosen[name]["extras"]
                if not new_extras:
                    continue
                chosen[name]["extras"] |= new_extras
                wheel, extras = chosen[name]["path"], new_extras
            else:
                wheel = fetch(req, wanted_version(req), tmp)
                version = str(parse_wheel_filename(wheel.name)[1])
                chosen[name] = {"version": version, "extras": set(extras), "path": wheel}
                print(f"gpu_wheels: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)", flush=True)
            for line in wheel_metadata(wheel).get_all("Requires-Dist") or []:
                dep = Requirement(line)
                if applies(dep, extras):
                    queue.append((dep, set(dep.extras)))
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        slimmed = {}
        for name, entry in sorted(chosen.items()):
            if name in SLIM:
                path, removed = slim(entry["path"], out, SLIM[name])
                slimmed[name] = {"from_bytes": entry["path"].stat().st_size, "to_bytes": path.stat().st_size,
                                 "uncompressed_bytes_removed": removed}
            else:
                path = Path(shutil.copy2(entry["path"], out / entry["path"].name))
            entry["wheel"] = path.name
    return {"wheels": {n: {"version": e["version"], "wheel": e["wheel"], "extras": sorted(e["extras"]),
                           "bytes": (out / e["wheel"]).stat().st_size} for n, e in sorted(chosen.items())},
            "on_the_machine": {n: sorted(set(s) - {""}) for n, s in sorted(machine.items())},
            "not_needed": dict(sorted(skipped.items())), "slimmed": slimmed}


def travelling_tree_bytes() -> int:
    """Bytes of the working tree the device tool sends: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def check(out: Path, manifest: dict) -> list[str]:
    """Problems with the folder (an empty list: none); see the module docstring, 4."""
    problems = []
    wheels = sorted(out.glob("*.whl"))
    names = [canonicalize_name(parse_wheel_filename(p.name)[0]) for p in wheels]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"{name}: more than one wheel (pip stops the whole install)")
    versions = {canonicalize_name(parse_wheel_filename(p.name)[0]): parse_wheel_filename(p.name)[1] for p in wheels}
    for path in wheels:
        if not parse_wheel_filename(path.name)[3] & MACHINE_TAGS:
            problems.append(f"{path.name}: no tag for CPython 3.12 on manylinux x86_64")
        extras = next((set(e["extras"]) for e in manifest["wheels"].values() if e["wheel"] == path.name), set())
        for line in wheel_metadata(path).get_all("Requires-Dist") or []:
            req = Requirement(line)
            if not applies(req, extras):
                continue
            name = canonicalize_name(req.name)
            if name in versions:
                if not req.specifier.contains(versions[name], prereleases=True):
                    problems.append(f"{path.name} needs {req}; the folder has {name} {versions[name]}")
            elif name in ON_THE_MACHINE:
                seen = MACHINE_VERSIONS.get(name)
                if seen and not req.specifier.contains(seen, prereleases=True):
                    problems.append(f"{path.name} needs {req}; the machine has {name} {seen}")
            elif name not in NOT_NEEDED:
                problems.append(f"{path.name} needs {req}: neither in the folder nor on the machine")
    for req in project_requirements():  # the project's own bounds against the machine's versions
        seen = MACHINE_VERSIONS.get(canonicalize_name(req.name))
        if seen and not req.specifier.contains(seen, prereleases=True):
            problems.append(f"pyproject.toml needs {req}; the machine has {req.name} {seen}")
    folder, tree = sum(p.stat().st_size for p in out.iterdir()), travelling_tree_bytes()
    if folder + tree > CALL_LIMIT:
        problems.append(f"{out.name} ({folder / 2 ** 20:.1f} MiB) + the working tree ({tree / 2 ** 20:.1f} MiB) "
                        f"exceed the {CALL_LIMIT / 2 ** 20:.0f} MiB one device call carries")
    manifest["sizes"] = {"folder_bytes": folder, "working_tree_bytes": tree, "call_limit_bytes": CALL_LIMIT}
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT), help="the folder (default .gpu_wheels/, ignored by git)")
    parser.add_argument("--check", action="store_true", help="check the folder already there; fetch nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.check:
        manifest = json.loads((out / "manifest.json").read_text())
    else:
        manifest = gather(out)
    problems = check(out, manifest)
    manifest["problems"] = problems
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    s = manifest["sizes"]
    print(f"gpu_wheels: {len(manifest['wheels'])} wheels, {s['folder_bytes'] / 2 ** 20:.1f} MiB in {out}; with the "
          f"working tree {(s['folder_bytes'] + s['working_tree_bytes']) / 2 ** 20:.1f} MiB of "
          f"{s['call_limit_bytes'] / 2 ** 20:.0f}")
    for p in problems:
        print(f"gpu_wheels: PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
