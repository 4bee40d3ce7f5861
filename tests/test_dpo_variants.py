"""The DPO-family table, and SimPO and ORPO: by hand, against naive per-row loops, invariants, refusals, the config
and CLI that read the table, and training runs on a tiny model."""

import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import learnable_pairs, read_metrics, run_cli, trainer_kwargs, write_jsonl

from prefalign.losses.dpo import DPO_LOSSES, HYPERPARAM_NAMES, dpo_loss

D = torch.float64
METRICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def nls(z):
    """-log sigmoid(z) = log(1 + e^-z)."""
    return math.log1p(math.exp(-z))


def mean(xs):
    return sum(xs) / len(xs)


def simpo_row(c, r, beta, gamma):
    """SimPO on one pair of per-token mean log-probs, straight from the paper's formula."""
    return nls(beta * c - beta * r - gamma)


def log_odds_row(avg_logp):
    q = math.exp(avg_logp)
    return math.log(q / (1 - q))


def orpo_row(c, r, lam):
    """ORPO on one pair of per-token mean log-probs: NLL of the chosen one plus lambda * -log sigmoid(log OR)."""
    return -c + lam * nls(log_odds_row(c) - log_odds_row(r))


# ---------------------------------------------------------------- the table
def test_each_entry_declares_what_the_trainer_reads():
    want = {  # name: (uses_reference, length_averaged, {hyperparameter: default})
        "sigmoid": (True, False, {"beta": 0.1, "label_smoothing": 0.0}),
        "ipo": (True, True, {"beta": 0.1}),
        "hinge": (True, False, {"beta": 0.1}),
        "robust": (True, False, {"beta": 0.1, "label_smoothing": 0.0}),
        "reference_free": (False, False, {"beta": 1.0}),
        "simpo": (False, True, {"beta": 2.0, "simpo_gamma": 1.0}),
        "orpo": (False, True, {"orpo_lambda": 0.1}),
    }
    got = {
        v.name: (v.uses_reference, v.length_averaged, {h.name: h.default for h in v.hyperparams})
        for v in DPO_LOSSES.values()
    }
    assert got == want
    assert all(name == v.name for name, v in DPO_LOSSES.items())


@pytest.mark.parametrize("variant", DPO_LOSSES.values(), ids=lambda v: v.name)
def test_each_function_takes_exactly_its_declared_hyperparameters(variant):
    params = inspect.signature(variant.fn).parameters
    assert next(iter(params)) == "p"
    assert {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} == {h.name for h in variant.hyperparams}
    for h in variant.hyperparams:
        h.check(h.default)  # every default is in its own range


@pytest.mark.parametrize("variant", DPO_LOSSES.values(), ids=lambda v: v.name)
def test_each_help_line_names_a_paper_and_never_the_seed(variant):
    assert "\n" not in variant.help and re.search(r"\b20\d\d\b", variant.help), variant.help
    assert "seed" not in variant.help.lower()
    assert all("seed" not in h.help.lower() and "\n" not in h.help for h in variant.hyperparams)


def test_a_hyperparameter_has_one_range_wherever_it_is_declared():
    for name in HYPERPARAM_NAMES:
        ranges = {v.hyperparam(name).allowed() for v in DPO_LOSSES.values() if v.hyperparam(name)}
        assert len(ranges) == 1, (name, ranges)


# ---------------------------------------------------------------- SimPO
def test_simpo_by_hand_with_stats():
    # per-token mean log-probs; beta 2, gamma 1: z = 2 (-1) - 2 (-1.5) - 1 = 0 and 2 (-2) - 2 (-1) - 1 = -3
    c = torch.tensor([-1.0, -2.0], dtype=D)
    r = torch.tensor([-1.5, -1.0], dtype=D)
    loss, stats = dpo_loss(c, r, None, None, loss_type="simpo", beta=2.0, simpo_gamma=1.0)
    assert loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(3))) / 2, rel=1e-12)
    assert stats["rewards/chosen"].item() == pytest.approx(-3.0)  # beta * mean avg_logp_c
    assert stats["rewards/rejected"].item() == pytest.approx(-2.5)
    assert stats["rewards/margins"].item() == pytest.approx(-0.5)
    assert stats["rewards/accuracies"].item() == 0.5  # -2 > -3 yes, -4 > -2 no
    default, _ = dpo_loss(c, r, None, None, loss_type="simpo")  # the table's beta 2, gamma 1
    assert default.item() == loss.item()


def test_simpo_matches_a_per_row_loop():
    g = torch.Generator().manual_seed(1)
    c, r = -3 * torch.rand(2, 9, generator=g, dtype=D)
    loss, _ = dpo_loss(c, r, None, None, loss_type="simpo", beta=2.5, simpo_gamma=0.7)
    assert loss.item() == pytest.approx(
        mean([simpo_row(a, b, 2.5, 0.7) for a, b in zip(c.tolist(), r.tolist())]), rel=1e-12
    )


def test_simpo_with_gamma_0_is_reference_free_and_gamma_shifts_the_margin():
    g = torch.Generator().manual_seed(2)
    c, r = -3 * torch.rand(2, 6, generator=g, dtype=D)
    simpo, s_stats = dpo_loss(c, r, None, None, loss_type="simpo", beta=1.5, simpo_gamma=0.0)
    free, f_stats = dpo_loss(c, r, None, None, loss_type="reference_free", beta=1.5)
    assert simpo.item() == pytest.approx(free.item(), rel=1e-12)
    assert s_stats["rewards/margins"].item() == pytest.approx(f_stats["rewards/margins"].item(), rel=1e-12)
    # a margin gamma is the same as lowering every chosen log-prob by gamma / beta
    shifted, _ = dpo_loss(c, r, None, None, loss_type="simpo", beta=1.5, simpo_gamma=0.6)
    moved, _ = dpo_loss(c - 0.6 / 1.5, r, None, None, loss_type="simpo", beta=1.5, simpo_gamma=0.0)
    assert shifted.item() == pytest.approx(moved.item(), rel=1e-12)


def test_simpo_gradient_by_hand():
    c = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    r = torch.tensor([-1.5, -1.0], dtype=D, requires_grad=True)
    dpo_loss(c, r, None, None, loss_type="simpo", beta=2.0, simpo_gamma=1.0)[0].backward()
    # d/dc nls(z) / B = -beta sigmoid(-z) / B, with z = [0, -3]
    expected = [-2.0 / (1 + math.exp(z)) / 2 for z in (0.0, -3.0)]
    assert c.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert r.grad.tolist() == pytest.approx([-x for x in expected], rel=1e-12)


# ---------------------------------------------------------------- ORPO
def test_orpo_by_hand_with_stats():
    # mean probabilities q: chosen 1/2 and 3/4 (log odds 0, ln 3), rejected 1/3 and 1/2 (log odds -ln 2, 0)
    c = torch.tensor([-math.log(2), -math.log(4 / 3)], dtype=D)
    r = torch.tensor([-math.log(3), -math.log(2)], dtype=D)
    lam = 0.1
    loss, stats = dpo_loss(c, r, None, None, loss_type="orpo", orpo_lambda=lam)
    # log odds ratios ln 2 and ln 3: -log sigmoid(ln k) = ln(1 + 1/k)
    rows = [math.log(2) + lam * math.log(1.5), math.log(4 / 3) + lam * math.log(4 / 3)]
    assert loss.item() == pytest.approx(mean(rows), rel=1e-12)
    assert stats["orpo/nll"].item() == pytest.approx(mean([math.log(2), math.log(4 / 3)]), rel=1e-12)
    assert stats["orpo/log_odds_ratio"].item() == pytest.approx(mean([math.log(2), math.log(3)]), rel=1e-12)
    assert stats["rewards/chosen"].item() == pytest.approx(c.mean().item())  # rewards are the mean log-probs
    assert stats["rewards/rejected"].item() == pytest.approx(r.mean().item())
    assert stats["rewards/accuracies"].item() == 1.0
    default, _ = dpo_loss(c, r, None, None, loss_type="orpo")  # the table's lambda 0.1
    assert default.item() == loss.item()


def test_orpo_matches_a_per_row_loop():
    g = torch.Generator().manual_seed(3)
    c, r = -3 * torch.rand(2, 9, generator=g, dtype=D) - 1e-3
    loss, stats = dpo_loss(c, r, None, None, loss_type="orpo", orpo_lambda=0.4)
    pairs = list(zip(c.tolist(), r.tolist()))
    assert loss.item() == pytest.approx(mean([orpo_row(a, b, 0.4) for a, b in pairs]), rel=1e-12)
    ratios = [log_odds_row(a) - log_odds_row(b) for a, b in pairs]
    assert stats["orpo/log_odds_ratio"].item() == pytest.approx(mean(ratios), rel=1e-10)


def test_orpo_is_its_nll_plus_lambda_ln2_when_the_odds_are_equal():
    g = torch.Generator().manual_seed(4)
    c = -3 * torch.rand(5, generator=g, dtype=D)
    for lam in (0.1, 1.0, 3.0):
        loss, stats = dpo_loss(c, c.clone(), None, None, loss_type="orpo", orpo_lambda=lam)
        assert stats["orpo/log_odds_ratio"].item() == 0.0
        assert loss.item() == pytest.approx(stats["orpo/nll"].item() + lam * math.log(2), rel=1e-12)
        assert stats["orpo/nll"].item() == pytest.approx(-c.mean().item(), rel=1e-12)
    # and as lambda -> 0 only the NLL is left, whatever the odds
    loss, _ = dpo_loss(c, c - 1, None, None, loss_type="orpo", orpo_lambda=1e-12)
    assert loss.item() == pytest.approx(-c.mean().item(), rel=1e-9)


def test_orpo_gradient_by_hand():
    c = torch.tensor([-0.5, -2.0], dtype=D, requires_grad=True)
    r = torch.tensor([-1.0, -0.25], dtype=D)
    lam = 0.5
    dpo_loss(c, r, None, None, loss_type="orpo", orpo_lambda=lam)[0].backward()
    # d log_odds(x) / dx = 1 / (1 - e^x); d nls(z) / dz = -sigmoid(-z)
    expected = []
    for a, b in zip([-0.5, -2.0], [-1.0, -0.25]):
        z = log_odds_row(a) - log_odds_row(b)
        expected.append((-1 - lam / (1 + math.exp(z)) / (1 - math.exp(a))) / 2)
    assert c.grad.tolist() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_orpo_stays_finite_when_a_completion_is_certain(dtype):
    """A float32 log-softmax rounds near-certain tokens to log-prob 0: infinite odds, clamped to finite ones."""
    c = torch.tensor([0.0, -1.0], dtype=dtype, requires_grad=True)
    r = torch.tensor([-1.0, 0.0], dtype=dtype, requires_grad=True)
    loss, stats = dpo_loss(c, r, None, None, loss_type="orpo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    assert stats["orpo/log_odds_ratio"].item() == pytest.approx(0.0, abs=1e-6)  # +x and -x on the two pairs


# ---------------------------------------------------------------- refusals of the loss
@pytest.mark.parametrize(
    "loss_type,kw,msg",
    [
        ("simpo", {"simpo_gamma": -1.0}, r"simpo_gamma must be >= 0, got -1.0"),
        ("simpo", {"beta": 0.0}, r"beta must be > 0, got 0.0"),
        ("orpo", {"orpo_lambda": 0.0}, r"orpo_lambda must be > 0, got 0.0"),
        ("orpo", {"orpo_lambda": float("nan")}, r"orpo_lambda must be > 0, got nan"),
        ("orpo", {"beta": 0.1}, r"loss_type 'orpo' does not use beta \(got 0.1\); it applies to \['hinge', 'ipo'"),
        (
            "sigmoid",
            {"simpo_gamma": 0.5},
            r"loss_type 'sigmoid' does not use simpo_gamma \(got 0.5\); it applies to "
            r"\['simpo'\]",
        ),
        ("simpo", {"orpo_lambda": 0.5}, r"does not use orpo_lambda"),
        ("simpo", {"label_smoothing": 0.1}, r"does not use label_smoothing"),
        (
            "simpo",
            {"betta": 0.1},
            r"unknown DPO hyperparameter betta; known: beta, label_smoothing, simpo_gamma, "
            r"orpo_lambda",
        ),
    ],
)
def test_hyperparameters_out_of_range_or_unused_are_refused(loss_type, kw, msg):
    refs = (None, None) if loss_type in ("simpo", "orpo") else (torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=msg):
        dpo_loss(torch.full((2,), -1.0), torch.full((2,), -2.0), *refs, loss_type=loss_type, **kw)


def test_a_default_valued_or_unset_hyperparameter_of_another_variant_passes():
    c, r = torch.full((2,), -1.0), torch.full((2,), -2.0)
    a, _ = dpo_loss(c, r, None, None, loss_type="simpo", label_smoothing=0.0, orpo_lambda=0.1, beta=None)
    b, _ = dpo_loss(c, r, None, None, loss_type="simpo")
    assert a.item() == b.item()


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_simpo_and_orpo_take_no_reference(loss_type):
    x = torch.full((2,), -1.0)
    with pytest.raises(ValueError, match=f"loss_type '{loss_type}' takes no reference log-probs; pass None for both"):
        dpo_loss(x, x, x, x, loss_type=loss_type)


# ---------------------------------------------------------------- the config reads the table
def test_config_fields_and_defaults_come_from_the_table(pairs):
    import dataclasses

    from prefalign.trainers.dpo import DPOConfig

    fields = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    for name in HYPERPARAM_NAMES:
        defaults = {v.hyperparam(name).default for v in DPO_LOSSES.values() if v.hyperparam(name)}
        assert fields[name] == (None if len(defaults) > 1 else defaults.pop()), name  # beta: per loss type
    resolved = {t: DPOConfig(data=str(pairs), loss_type=t).loss_hyperparams for t in DPO_LOSSES}
    assert resolved["simpo"] == {"beta": 2.0, "simpo_gamma": 1.0}
    assert resolved["orpo"] == {"orpo_lambda": 0.1}
    assert resolved["sigmoid"] == {"beta": 0.1, "label_smoothing": 0.0}
    assert DPOConfig(data=str(pairs), loss_type="orpo").resolved_beta is None
    assert DPOConfig(data=str(pairs), loss_type="simpo", beta=3.0, simpo_gamma=0.0).loss_hyperparams == {
        "beta": 3.0,
        "simpo_gamma": 0.0,
    }
    for t, v in DPO_LOSSES.items():
        assert DPOConfig(data=str(pairs), loss_type=t).uses_reference == v.uses_reference


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"loss_type": "simpo", "simpo_gamma": -1.0}, r"^--simpo-gamma must be >= 0, got -1.0$"),
        ({"loss_type": "orpo", "orpo_lambda": 0.0}, r"^--orpo-lambda must be > 0, got 0.0$"),
        ({"loss_type": "simpo", "beta": -2.0}, r"^--beta must be > 0, got -2.0$"),
        ({"loss_type": "orpo", "beta": 0.1}, r"^--loss-type 'orpo' does not use --beta \(got 0.1\)"),
        (
            {"loss_type": "sigmoid", "simpo_gamma": 0.5},
            r"^--loss-type 'sigmoid' does not use --simpo-gamma \(got 0.5\); "
            r"it applies to \['simpo'\]$",
        ),
        ({"loss_type": "simpo", "orpo_lambda": 0.2}, r"^--loss-type 'simpo' does not use --orpo-lambda"),
        ({"loss_type": "orpo", "label_smoothing": 0.1}, r"^--loss-type 'orpo' does not use --label-smoothing"),
        ({"loss_type": "simpo", "ref": "x"}, r"^--ref is unused by --loss-type simpo \(it takes no reference\)"),
        ({"loss_type": "orpo", "ref": "x"}, r"^--ref is unused by --loss-type orpo"),
    ],
)
def test_config_refuses_out_of_range_and_unused_hyperparameters(pairs, kw, msg):
    from prefalign.trainers.dpo import DPOConfig

    with pytest.raises(ValueError, match=msg):
        DPOConfig(data=str(pairs), **kw)


def _help_text(capsys) -> str:
    from prefalign.cli.dpo import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.replace("│", " ").split())  # unwrap tyro's box


def test_help_lists_every_table_entry_and_hyperparameter(capsys):
    text = _help_text(capsys)
    loss_type_help = text.split("--loss-type STR", 1)[1].split("--beta", 1)[0]
    for v in DPO_LOSSES.values():
        assert f"{v.name}: {' '.join(v.help.split())}" in loss_type_help, v.name
    assert "0.1 for sigmoid, ipo, hinge, robust; 1 for reference_free; 2 for simpo; must be > 0" in text
    assert "(default: 1; must be >= 0; another --loss-type refuses a value other than the default) simpo: " in text
    assert "(default: 0.1; must be > 0; another --loss-type refuses a value other than the default) orpo: " in text
    assert "seed" not in loss_type_help.lower()


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--loss-type", "simpo", "--simpo-gamma", "-1"], "--simpo-gamma must be >= 0, got -1.0"),
        (
            ["--loss-type", "sigmoid", "--orpo-lambda", "0.5"],
            "--loss-type 'sigmoid' does not use --orpo-lambda (got 0.5)",
        ),
    ],
)
def test_cli_refuses_a_bad_hyperparameter_in_one_line(tmp_path, pairs, args, msg):
    r = run_cli("dpo", "--data", pairs, "--output", tmp_path / "x", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], r.stderr[-2000:]


# ---------------------------------------------------------------- training runs
def _train(tmp_path, tiny_model_dir, data, **kw):
    from prefalign.trainers.dpo import DPOConfig, DPOTrainer

    trainer = DPOTrainer(DPOConfig(**trainer_kwargs(tmp_path, tiny_model_dir, data, **kw)))
    final = trainer.train()
    return trainer, final, read_metrics(tmp_path / "run")


def _naive_loss(trainer, batch) -> float:
    """The batch's loss from per-token log-probs averaged by hand and the per-row formula of the loss type."""
    from prefalign.models.logprobs import completion_logprobs

    model = trainer.accelerator.unwrap_model(trainer.model)
    mask = batch["completion_mask"]
    with torch.no_grad():
        logps = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], mask)
    avg = ((logps * mask).sum(-1) / mask.sum(-1)).tolist()  # (2N,) per-token means
    n = len(avg) // 2
    hp = trainer.cfg.loss_hyperparams
    if trainer.cfg.loss_type == "simpo":
        return mean([simpo_row(avg[i], avg[n + i], hp["beta"], hp["simpo_gamma"]) for i in range(n)])
    return mean([orpo_row(avg[i], avg[n + i], hp["orpo_lambda"]) for i in range(n)])


@pytest.mark.parametrize("loss_type,kw", [("simpo", {"precompute_ref": True}), ("orpo", {})])
def test_simpo_and_orpo_train_without_a_reference(tmp_path, tiny_model_dir, loss_type, kw):
    import yaml
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(48))  # the tiny model starts out wrong on it
    trainer, final, rows = _train(
        tmp_path, tiny_model_dir, data, loss_type=loss_type, max_steps=10, eval_split=0.25, **kw
    )
    assert trainer.ref_model is None and trainer.ref_cache is None  # --precompute-ref is a no-op here
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    start = rows[0]
    assert start["step"] == 0 and start["eval/rewards/accuracies"] < 0.5
    assert final["eval/rewards/accuracies"] == 1.0 and final["eval/loss"] < start["eval/loss"]
    assert final["eval/rewards/margins"] > start["eval/rewards/margins"]
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters():
        assert p.requires_grad and not torch.equal(p.detach(), before[name]), f"{name} did not change"
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {k: run.get(k) for k in HYPERPARAM_NAMES} == {
        **dict.fromkeys(HYPERPARAM_NAMES),
        **trainer.cfg.loss_hyperparams,
    }
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["beta"] is None  # the user's value
    # the trainer feeds per-token means and the table's hyperparameters: its loss is the naive one
    batch = trainer._to_device(trainer.collate(trainer.train_data[:6]))
    with torch.no_grad():
        loss, _ = trainer.compute_loss(batch)
    assert loss.item() == pytest.approx(_naive_loss(trainer, batch), rel=1e-5)
    if loss_type == "simpo":  # rewards are beta * the per-token mean, beta the table's 2
        for r in rows:
            if "rewards/chosen" in r:
                assert r["rewards/chosen"] == pytest.approx(2.0 * r["logps/chosen"], rel=1e-6)
    else:
        assert {"orpo/nll", "orpo/log_odds_ratio", "eval/orpo/nll", "eval/orpo/log_odds_ratio"} <= set(final)
        assert final["orpo/nll"] == pytest.approx(-final["logps/chosen"], rel=1e-6)


def test_orpo_keys_are_documented():
    body = METRICS_DOC.read_text(encoding="utf-8").split("\n## `prefalign dpo`\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([\w/]+)`", body))
    assert {"orpo/nll", "orpo/log_odds_ratio"} <= documented
    assert "`eval/<key>`" in body


def test_readme_lists_every_loss_type_with_its_defaults():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*\|$", readme, flags=re.M)}
    for v in DPO_LOSSES.values():
        assert v.name in rows, v.name
        for h in v.hyperparams:  # `--flag` (default) as the table declares it
            assert f"`--{h.name.replace('_', '-')}` ({h.default:g})" in rows[v.name], (v.name, h.name)
