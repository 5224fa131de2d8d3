"""Check that a folder of wheels, plus the device image's packages, satisfies itself.

Usage: python scripts/check_wheels.py .whl [more wheel folders...]

For every wheel (and the project's own pyproject dependencies) each Requires-Dist whose marker
holds on the device (CPython 3.12, Linux x86_64; extras only where some requirement asks for
them) must be met by a wheel in the folders, or by a package of the device image (KINDS.md's
list; its version is checked where KINDS.md records one, else reported as unchecked). Also
checks: one version per project, wheel tags installable on cp312 manylinux x86_64.
Exit status 1 on any gap. Runs on this machine's Python (3.11 is fine: nothing is installed).
"""

from __future__ import annotations

import re
import sys
import tomllib
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
KINDS = Path("/work/.library/device/KINDS.md")

# The device image's Python packages (KINDS.md, read 2026-11-17); refreshed from KINDS.md when
# that file is present.
DEVICE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split()

# Versions seen on the device (KINDS.md 'pip list' row, 2026-11).
DEVICE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0",
    "triton": "3.6.0", "onnx": "1.23.1", "onnxruntime": "1.30.0",
}

MARKER_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "implementation_version": "3.12.3", "platform_release": "", "platform_version": "",
}
MAX_GLIBC = (2, 39)  # Ubuntu 24.04 (Python 3.12.3); manylinux tags above this would not install


def device_packages() -> tuple[set[str], dict[str, str]]:
    names = {canonicalize_name(n) for n in DEVICE_PACKAGES}
    versions = {canonicalize_name(k): v for k, v in DEVICE_VERSIONS.items()}
    if KINDS.is_file():
        text = KINDS.read_text()
        m = re.search(r"^Packages: (.+?)\.\s*$", text, re.M)
        if m:
            names |= {canonicalize_name(n.strip()) for n in m.group(1).split(",")}
        for row in re.findall(r"One session's pip list[^:]*: (.+?) \|", text):
            for name, ver in re.findall(r"([A-Za-z0-9_.\-]+) ([0-9][^\s,]*)", row):
                versions[canonicalize_name(name)] = ver
    names |= set(versions)  # e.g. safetensors: in the pip list row, not in the Packages line
    return names, versions


def tag_ok(tags) -> bool:
    for t in tags:
        if t.interpreter not in ("py3", "py2", "cp312", "py312") and not (
            t.interpreter.startswith("cp3") and t.abi == "abi3" and int(t.interpreter[3:]) <= 12
        ):
            continue
        if t.abi not in ("none", "abi3", "cp312"):
            continue
        p = t.platform
        if p == "any" or p in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"):
            return True
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", p)
        if m and (int(m.group(1)), int(m.group(2))) <= MAX_GLIBC:
            return True
    return False


def main(folders: list[str]) -> int:
    problems: list[str] = []
    wheels: dict[str, tuple[Version, Path, list[Requirement]]] = {}
    total = 0
    for folder in folders:
        for path in sorted(Path(folder).glob("*.whl")):
            total += path.stat().st_size
            name, version, _build, tags = parse_wheel_filename(path.name)
            if name in wheels:
                problems.append(f"two versions of {name}: {wheels[name][1].name}, {path.name}")
            if not tag_ok(tags):
                problems.append(f"{path.name}: no tag installable on cp312 manylinux x86_64")
            with zipfile.ZipFile(path) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                lines = z.read(meta).decode("utf-8", "replace").splitlines()
            reqs = []
            for line in lines:
                if line.startswith("Requires-Dist:"):
                    reqs.append(Requirement(line.split(":", 1)[1].strip()))
                elif not line.strip():
                    break  # end of headers
            wheels[name] = (version, path, reqs)

    dev_names, dev_versions = device_packages()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]

    # BFS over (requirer, requirement), following extras that something asks for.
    queue: list[tuple[str, Requirement, str]] = [
        ("optimizer(pyproject)", Requirement(r), "") for r in project
    ]
    done_extras: set[tuple[str, str]] = set()
    for name, (_v, _p, reqs) in wheels.items():
        for r in reqs:
            queue.append((name, r, ""))
    rows = []
    seen: set[tuple[str, str]] = set()
    while queue:
        who, req, extra = queue.pop(0)
        name = canonicalize_name(req.name)
        key = (who, str(req))
        if key in seen:
            continue
        seen.add(key)
        env = dict(MARKER_ENV, extra=extra)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if name in wheels:
            ver = wheels[name][0]
            ok = req.specifier.contains(ver, prereleases=True)
            rows.append((who, str(req), f".whl {ver}", "ok" if ok else "VERSION MISMATCH"))
            if not ok:
                problems.append(f"{who} needs {req}, .whl has {ver}")
            for e in req.extras:
                if (name, e) in done_extras:
                    continue
                done_extras.add((name, e))
                for r in wheels[name][2]:
                    if r.marker is not None and "extra" in str(r.marker):
                        queue.append((f"{name}[{e}]", r, e))
        elif name in dev_names:
            known = dev_versions.get(name)
            note = ""
            if req.extras:
                note = f" (extras {sorted(req.extras)} not checked)"
            if known:
                ok = req.specifier.contains(Version(known), prereleases=True)
                rows.append((who, str(req), f"device {known}", ("ok" if ok else "VERSION MISMATCH") + note))
                if not ok:
                    problems.append(f"{who} needs {req}, the device has {known}")
            else:
                status = "ok" if not str(req.specifier) else "version unchecked"
                rows.append((who, str(req), "device ?", status + note))
        else:
            rows.append((who, str(req), "-", "MISSING"))
            problems.append(f"{who} needs {req}: neither in the wheels nor on the device")

    width = max(len(r[0]) for r in rows)
    for who, req, where, status in sorted(rows, key=lambda r: (r[3] == "ok", r[0], r[1])):
        print(f"{who:<{width}}  {req:<45} {where:<22} {status}")
    shadow = sorted(n for n in wheels if n in dev_names)
    print(f"\n{len(wheels)} wheels, {total / 2**20:.1f} MiB; shadowing image packages: {', '.join(shadow)}")
    unchecked = sorted(
        {(lambda q: f"{q.name}{q.specifier}")(Requirement(r[1])) for r in rows
         if r[3].startswith("version unchecked")}
    )
    if unchecked:
        print("device versions to confirm there (pip show):", "; ".join(unchecked))
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print("  " + p)
        return 1
    print("OK: every requirement is met by the wheels or the device image")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(ROOT / ".whl")]))
