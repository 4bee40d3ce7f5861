"""glibc malloc tuning (prefalign/allocator.py): applied once per process by runs and the CLI, never on import."""

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.environ.get("PREFALIGN_MALLOC") == "default", reason="mallopt is glibc's"
)

# 64 blocks of 1 MiB, written, freed, then the same again: the minor page faults of the second round. glibc's
# default trims the 64 MiB freed at the heap's top, so the second round faults every page in again (~16k faults)
FAULTS = """
import resource, sys, torch
import prefalign
from prefalign.allocator import tune_malloc
state = tune_malloc() if sys.argv[1] == "tune" else "untouched"
def one_round():
    blocks = [torch.empty(2**18).fill_(1.0) for _ in range(64)]
    del blocks
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_round()
print(state, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(*args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for k in ("PREFALIGN_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD"):
        base.pop(k, None)
    r = subprocess.run(
        [sys.executable, "-c", FAULTS, *args], capture_output=True, text=True, env={**base, **env}, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    state, faults = r.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return state, int(faults)


@glibc
def test_tuned_heap_reuses_freed_blocks_instead_of_faulting_them_in_again():
    state, tuned = _run("tune")
    untouched_state, untouched = _run("off")
    assert (state, untouched_state) == ("tuned", "untouched")
    assert untouched > 12_000  # importing prefalign alone tunes nothing: 64 MiB of 4 KiB pages faulted again
    assert tuned < untouched / 4, (tuned, untouched)


@glibc
def test_the_users_own_setting_wins():
    assert _run("tune", PREFALIGN_MALLOC="default")[0] == "default (PREFALIGN_MALLOC=default)"
    assert _run("tune", PREFALIGN_MALLOC="tuned")[0] == "tuned"
    assert _run("tune", MALLOC_ARENA_MAX="2")[0] == "default (MALLOC_ARENA_MAX set)"
    # a preloaded malloc replaces glibc's (ld.so only warns that this one does not exist)
    assert _run("tune", LD_PRELOAD="/nowhere/libjemalloc.so.2")[0] == "default (LD_PRELOAD=/nowhere/libjemalloc.so.2)"
    assert _run("tune", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")[0] == "default (GLIBC_TUNABLES set)"


@glibc
@pytest.mark.skipif(
    any(k.startswith("MALLOC_") for k in os.environ)
    or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    or "malloc" in os.environ.get("LD_PRELOAD", "")
    or os.environ.get("PREFALIGN_MALLOC", "tuned") != "tuned",
    reason="this environment tunes glibc itself: the run rightly leaves it",
)
def test_a_cli_run_records_its_allocator_in_run_json(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"review {i}: the movie was\n" for i in range(8)))
    out = tmp_path / "run"
    r = run_cli(
        "rl", "--prompts", prompts, "--reward", "vader", "--model", tiny_model_dir, "--output", out,
        "--max-steps", "1", "--rollout-batch-size", "2", "--num-generations", "2", "--max-new-tokens", "3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["malloc"] == "tuned"
