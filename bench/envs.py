"""The benchmark's virtual environments: the project's ``.venv`` (prefalign) and two TRL venvs under ``.bench/``.

- ``.bench/trl-1.16``: TRL 1.16.0 (DPOTrainer, RewardTrainer) with the *same* transformers, peft and
  accelerate versions as the project venv, so both sides run the same model code.
- ``.bench/trl-1.12``: TRL 1.12.0, the last release with PPO (``trl.experimental.ppo``), same pins.

torch is installed first and pinned (2.13.0 is the CPU build on local disk; an unpinned torch pulls a
multi-GB CUDA build). Each venv is built once; a stamp file records what it was built with, and a
change of pins rebuilds it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
TORCH = "torch==2.13.0"
# Packages whose versions the TRL venvs copy from the project venv: the model code must be identical.
SHARED = ("transformers", "peft", "accelerate", "tokenizers", "safetensors")
TRL_VENVS = {"trl-1.16": "trl==1.16.0", "trl-1.12": "trl==1.12.0"}


def venv_python(name: str) -> Path:
    return PROJECT_PY if name == "prefalign" else BENCH_DIR / name / "bin" / "python"


def project_versions(packages: tuple[str, ...] = ("torch", *SHARED)) -> dict[str, str]:
    """Versions of ``packages`` (by default ``SHARED`` and torch) in the project venv (which ``make install`` built)."""
    code = f"import json, importlib.metadata as m; print(json.dumps({{p: m.version(p) for p in {packages!r}}}))"
    out = subprocess.run([str(PROJECT_PY), "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def ensure_project_venv() -> None:
    if not PROJECT_PY.exists():
        subprocess.run(["make", "install"], cwd=ROOT, check=True)


def ensure_trl_venv(name: str, log=print) -> Path:
    """Build ``.bench/<name>`` unless its stamp matches the wanted pins; return its python."""
    pins = project_versions()
    wanted = [TRL_VENVS[name]] + [f"{p}=={pins[p]}" for p in SHARED]
    venv = BENCH_DIR / name
    stamp = venv / ".bench-installed.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return venv_python(name)
    log(f"[bench] building {venv} ({', '.join(wanted)}) ...")
    if not venv_python(name).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(name)), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH], check=True)
    subprocess.run(pip + wanted, check=True)
    stamp.write_text(json.dumps(wanted))
    return venv_python(name)


def installed_versions(name: str, python: Path | None = None) -> dict[str, str]:
    """Versions of the relevant packages inside one venv, or of ``python`` where given (for the report)."""
    pkgs = ("torch", "transformers", "peft", "accelerate", "trl", "prefalign")
    code = (
        "import json, importlib.metadata as m\nout = {}\n"
        f"for p in {pkgs!r}:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    out = subprocess.run(
        [str(python or venv_python(name)), "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


# What a GPU machine without a package index lacks to run both sides (`gpu_wheels`): the model code at the project
# venv's versions, and prefalign's and TRL's dependencies that the lent H200's image does not hold (its package list:
# PyTorch, numpy, pandas, pyarrow, xxhash, rich, the Hugging Face hub ... are there, and are not carried). Pinned to
# the project venv's versions, so both races run the same code.
GPU_WHEELS = (
    *SHARED,
    "datasets",
    "dill",
    "multiprocess",
    "fsspec",
    "regex",
    "tyro",
    "docstring_parser",
    "typeguard",
    "typing_extensions",
    "gguf",
    "vaderSentiment",
)
# manylinux tags pip matches exactly: a compiled wheel (tokenizers, safetensors, regex) carries one of these
MANYLINUX = ("manylinux2014", "manylinux_2_17", "manylinux_2_24", "manylinux_2_27", "manylinux_2_28", "manylinux_2_34")


def gpu_wheel_commands(target: Path, versions: dict[str, str], python_version: str) -> list[list[str]]:
    """The ``pip download`` commands that fill ``target``: ``common/`` (``GPU_WHEELS`` at ``versions``),
    ``trl116/`` and ``trl112/`` (one TRL each: two versions of one package cannot share a folder on a path)."""
    base = [str(PROJECT_PY), "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    base += ["--python-version", python_version, "--implementation", "cp"]
    base += [arg for tag in MANYLINUX for arg in ("--platform", f"{tag}_x86_64")]
    folders = {"common": [f"{p}=={versions[p]}" for p in GPU_WHEELS]}
    folders.update({name.replace("-", "").replace(".", ""): [pin] for name, pin in TRL_VENVS.items()})
    return [base + ["--dest", str(target / folder), *pins] for folder, pins in folders.items()]


def gpu_wheels(target: Path, python_version: str = "3.12") -> None:
    """Download the wheels `bench/gpu.sh` installs with ``WHEELS=target`` on a GPU machine without a package index
    (x86-64 Linux, CPython ``python_version``)."""
    versions = project_versions(GPU_WHEELS)
    for cmd in gpu_wheel_commands(target, versions, python_version):
        # only this download's wheels in the folder: gpu.sh installs every one it finds there
        shutil.rmtree(cmd[cmd.index("--dest") + 1], ignore_errors=True)
        subprocess.run(cmd, check=True)
    size = sum(f.stat().st_size for f in target.rglob("*.whl")) / 2**20
    print(
        f"wrote {target}: {', '.join(f'{p} {v}' for p, v in versions.items())}, {', '.join(TRL_VENVS.values())} "
        f"({size:.0f} MiB)"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.envs", description="The benchmark's environments.")
    ap.add_argument(
        "--gpu-wheels", metavar="DIR", required=True, help="download the wheels bench/gpu.sh's WHEELS takes"
    )
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's CPython (default 3.12)")
    args = ap.parse_args(argv)
    gpu_wheels(Path(args.gpu_wheels), args.python_version)


if __name__ == "__main__":
    main()
