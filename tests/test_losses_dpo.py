"""DPO family: each variant by hand, invariants, gradients, stats, and every refusal."""

import math

import pytest
import torch

from prefalign.losses.dpo import DPO_LOSSES, dpo_loss, dpo_pair_loss, pair_loss_summary

D = torch.float64
PC = torch.tensor([-10.0, -20.0], dtype=D)  # policy chosen
PR = torch.tensor([-12.0, -18.0], dtype=D)  # policy rejected
RC = torch.tensor([-11.0, -20.0], dtype=D)  # reference chosen
RR = torch.tensor([-11.0, -19.0], dtype=D)  # reference rejected
# chosen log-ratios [1, 0], rejected [-1, 1], h = [2, -1]; with beta = 0.5, beta h = [1, -0.5]
BETA = 0.5
BH = [1.0, -0.5]


def nls(z):
    """-log sigmoid(z) = log(1 + e^-z)."""
    return math.log1p(math.exp(-z))


def mean(xs):
    return sum(xs) / len(xs)


def test_pair_loss_holds_each_pair_before_the_mean():
    """What a held-out pair's margin is read from (eval_pairs.jsonl): per-pair losses and rewards, whose means are
    dpo_loss's loss and stats."""
    out = dpo_pair_loss(PC, PR, RC, RR, beta=BETA)
    assert out.losses.tolist() == pytest.approx([nls(z) for z in BH])
    assert (out.chosen_rewards - out.rejected_rewards).tolist() == pytest.approx(BH)
    loss, stats = pair_loss_summary(out)
    want_loss, want_stats = dpo_loss(PC, PR, RC, RR, beta=BETA)
    assert torch.equal(loss, want_loss) and stats.keys() == want_stats.keys()
    assert all(torch.equal(stats[key], want_stats[key]) for key in stats)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'nope'"):
        dpo_pair_loss(PC, PR, RC, RR, loss_type="nope")


def test_table_holds_exactly_the_documented_variants():
    assert set(DPO_LOSSES) == {"sigmoid", "robust", "hinge", "ipo", "reference_free", "simpo", "orpo"}


def test_sigmoid_by_hand_with_stats():
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=BETA)
    assert loss.item() == pytest.approx(mean([nls(z) for z in BH]))
    assert stats["rewards/chosen"].item() == pytest.approx(0.5 * mean([1, 0]))
    assert stats["rewards/rejected"].item() == pytest.approx(0.5 * mean([-1, 1]))
    assert stats["rewards/margins"].item() == pytest.approx(mean(BH))
    assert stats["rewards/accuracies"].item() == 0.5
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_cdpo_by_hand_and_eps_zero_is_plain_dpo():
    eps = 0.1
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=eps)
    assert loss.item() == pytest.approx(mean([(1 - eps) * nls(z) + eps * nls(-z) for z in BH]))
    plain, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=0.0)
    assert plain.item() == pytest.approx(mean([nls(z) for z in BH]))


def test_robust_by_hand_and_eps_zero_is_plain_dpo():
    eps = 0.2
    loss, _ = dpo_loss(PC, PR, RC, RR, loss_type="robust", beta=BETA, label_smoothing=eps)
    # (-(1 - eps) log s(z) + eps log s(-z)) / (1 - 2 eps) = ((1 - eps) nls(z) - eps nls(-z)) / 0.6
    expected = mean([((1 - eps) * nls(z) - eps * nls(-z)) / (1 - 2 * eps) for z in BH])
    assert loss.item() == pytest.approx(expected)
    plain, _ = dpo_loss(PC, PR, RC, RR, loss_type="robust", beta=BETA)
    assert plain.item() == pytest.approx(mean([nls(z) for z in BH]))


def test_hinge_by_hand_and_gradient():
    # policy chosen -9 instead of -10: h = [3, -1], beta h = [1.5, -0.5]
    pc = torch.tensor([-9.0, -20.0], dtype=D, requires_grad=True)
    loss, _ = dpo_loss(pc, PR, RC, RR, loss_type="hinge", beta=BETA)
    assert loss.item() == pytest.approx(mean([max(0.0, 1 - 1.5), max(0.0, 1 + 0.5)]))  # 0.75
    loss.backward()
    # pair 0 is past the hinge (flat); pair 1: d/dpc relu(1 - beta h) / B = -beta / 2
    assert pc.grad.tolist() == pytest.approx([0.0, -BETA / 2])


def test_ipo_by_hand():
    loss, _ = dpo_loss(PC, PR, RC, RR, loss_type="ipo", beta=BETA)
    # target 1 / (2 * 0.5) = 1; h = [2, -1]: (2 - 1)^2 = 1, (-1 - 1)^2 = 4
    assert loss.item() == pytest.approx(2.5)


def test_reference_free_beta_one_is_pairwise_log_likelihood():
    loss, stats = dpo_loss(PC, PR, None, None, loss_type="reference_free", beta=1.0)
    # -log sigmoid(logp_c - logp_r) with differences [2, -2]
    assert loss.item() == pytest.approx(mean([nls(2.0), nls(-2.0)]))
    assert stats["rewards/chosen"].item() == pytest.approx(-15.0)  # beta * mean logp_c
    assert stats["rewards/margins"].item() == pytest.approx(0.0)
    loss, _ = dpo_loss(PC, PR, None, None, loss_type="reference_free", beta=0.25)
    assert loss.item() == pytest.approx(mean([nls(0.5), nls(-0.5)]))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.3), ("robust", 0.3)])
def test_policy_equal_to_reference_gives_ln2(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    c, r = -50 * torch.rand(2, 6, generator=g, dtype=D)
    loss, stats = dpo_loss(c, r, c.clone(), r.clone(), loss_type=loss_type, beta=3.0, label_smoothing=eps)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["rewards/accuracies"].item() == 0.0 and stats["rewards/margins"].item() == 0.0


def test_sigmoid_gradient_by_hand_and_reference_is_constant():
    pc = PC.clone().requires_grad_(True)
    pr = PR.clone().requires_grad_(True)
    rc = RC.clone().requires_grad_(True)
    loss, _ = dpo_loss(pc, pr, rc, RR, beta=BETA)
    loss.backward()
    # d/dpc of -log sigmoid(beta h) / B = -beta * sigmoid(-beta h) / B
    expected = [-BETA / (1 + math.exp(z)) / 2 for z in BH]
    assert pc.grad.tolist() == pytest.approx(expected)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected])
    assert rc.grad is None


def test_unknown_loss_type_lists_choices():
    with pytest.raises(ValueError, match=r"'kto'.*hinge.*ipo.*reference_free.*robust.*sigmoid"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=beta)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.01])
def test_label_smoothing_range(eps):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "reference_free"])
def test_label_smoothing_refused_where_unused(loss_type):
    refs = (None, None) if loss_type == "reference_free" else (RC, RR)
    with pytest.raises(ValueError, match="does not use label_smoothing"):
        dpo_loss(PC, PR, *refs, loss_type=loss_type, label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("refs", [(None, None), (RC, None), (None, RR)])
def test_reference_required(loss_type, refs):
    with pytest.raises(ValueError, match="needs both ref_chosen_logps and ref_rejected_logps"):
        dpo_loss(PC, PR, *refs, loss_type=loss_type)


@pytest.mark.parametrize("refs", [(RC, RR), (RC, None)])
def test_reference_free_refuses_reference(refs):
    with pytest.raises(ValueError, match="takes no reference"):
        dpo_loss(PC, PR, *refs, loss_type="reference_free")


def test_shapes_refused():
    with pytest.raises(ValueError, match="shape mismatch"):
        dpo_loss(PC, PR, RC, RR[:1])
    with pytest.raises(ValueError, match="shape mismatch"):
        dpo_loss(PC, PR[:1], None, None, loss_type="reference_free")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_loss(PC[:, None], PR[:, None], RC[:, None], RR[:, None])
