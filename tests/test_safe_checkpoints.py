"""Checkpoints that cannot run code: every file loads with ``weights_only=True``; anything else is refused."""

import pathlib
import pickle
import random

import numpy as np
import pytest
import torch
from conftest import run_cli, trainer_kwargs

from prefalign.trainers.checkpoint import CheckpointManager, UnsafeCheckpoint, rng_state, set_rng_state
from prefalign.trainers.dpo import DPOConfig, DPOTrainer


class TouchOnLoad:
    """Unpickling this creates ``marker``: what a malicious checkpoint could do with any other call."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _draws():
    return (
        torch.rand(3).tolist(),
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
    )


def test_rng_state_is_plain_and_restores_every_generator_exactly(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # a cached second Gaussian is part of the state too
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == want


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """A 2-step DPO run with a checkpoint after each step."""
    from conftest import learnable_pairs, write_jsonl

    tmp = tmp_path_factory.mktemp("safe")
    pairs = write_jsonl(tmp / "pairs.jsonl", learnable_pairs(16))
    kw = trainer_kwargs(tmp, tiny_model_dir, pairs, max_steps=2, save_steps=1, batch_size=2)
    DPOTrainer(DPOConfig(**kw)).train()
    return tmp, kw


def _copy(run_dir, tmp_path):
    import shutil

    return pathlib.Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_every_file_of_a_checkpoint_loads_tensors_only(dpo_run):
    tmp, _ = dpo_run
    files = sorted((tmp / "run" / "checkpoints" / "step-0000002").glob("*.pt"))
    assert [f.name for f in files] == ["model.pt", "optimizer.pt", "rng.pt", "scheduler.pt"]
    for f in files:
        torch.load(f, weights_only=True)  # optimizer (AdamW state by name), LambdaLR (its lambda saved as None)


def test_a_checkpoint_that_would_run_code_is_refused_on_resume_and_the_code_never_runs(dpo_run, tmp_path):
    """`--resume latest` on a checkpoint whose rng.pt runs code when unpickled: one line, exit 2, no older
    checkpoint quietly used instead, and the code did not run."""
    tmp, kw = dpo_run
    out = _copy(tmp / "run", tmp_path)
    proof = tmp_path / "proof"
    torch.save(TouchOnLoad(proof), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert proof.exists()  # the payload is real: an unsafe load runs it
    marker = tmp_path / "marker"
    rng_pt = out / "checkpoints" / "step-0000002" / "rng.pt"
    torch.save({"torch": torch.get_rng_state(), "x": TouchOnLoad(marker)}, rng_pt)
    r = run_cli(
        "dpo",
        "--data",
        kw["data"],
        "--model",
        kw["model"],
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--precision",
        "fp32",
        "--output",
        out,
        "--resume",
        "latest",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rng.pt: holds objects that could run code" in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not marker.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the protocol before refusing
def test_a_bare_pickle_is_refused_in_one_line(dpo_run, tmp_path):
    tmp, _ = dpo_run
    out = _copy(tmp / "run", tmp_path)
    marker = tmp_path / "marker"
    (out / "checkpoints" / "step-0000002" / "optimizer.pt").write_bytes(pickle.dumps(TouchOnLoad(marker)))
    with pytest.raises(
        UnsafeCheckpoint,
        match=r"optimizer.pt: holds objects that could run code when loaded "
        r"\(a bare pickle\).*start again without --resume",
    ) as err:
        CheckpointManager(out, keep=2).load_for_resume("latest")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_checkpoint_from_before_tensor_only_rng_is_refused_with_what_to_do(dpo_run, tmp_path):
    """The previous release saved python's and numpy's RNG states as they come (numpy arrays inside)."""
    tmp, _ = dpo_run
    out = _copy(tmp / "run", tmp_path)
    for ckpt in (out / "checkpoints").glob("step-*"):
        torch.save(
            {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            ckpt / "rng.pt",
        )
    with pytest.raises(
        UnsafeCheckpoint,
        match=r"step-0000002/rng.pt: written by prefalign before checkpoints held "
        r"tensors only .*version that wrote it, or start it again",
    ):
        CheckpointManager(out, keep=2).load_for_resume("latest")


def test_resume_latest_without_any_checkpoint_says_so(tmp_path):
    from prefalign.errors import UserError

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match=r"checkpoints: no checkpoint to resume from; start again without --resume$"):
        CheckpointManager(tmp_path, keep=2).load_for_resume("latest")


def test_each_process_resumes_its_own_rng_state():
    from prefalign.trainers.checkpoint import process_rng_state

    states = [{"torch": torch.tensor([0])}, {"torch": torch.tensor([1])}]
    assert [process_rng_state({"processes": states}, r)["torch"].item() for r in range(3)] == [0, 1, 0]
    before = {"torch": torch.tensor([7])}  # a checkpoint from before every process saved its own: the main's
    assert process_rng_state(before, 1) is before
