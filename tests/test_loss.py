"""The loss block of sspo.py against its formulas (docs/method.md §1, §3, §4) on random tensors."""
import math

import pytest
import torch

from sspo import (calibrate, calibrate_pair, choose_pair, latent_distance, objective, preference_loss, preference_terms,
                  rep_weight_used, repulsion_loss, semantic_gate, win_rates)


def random_game(k, batch=(), seed=0):
    """A random constant-sum preference matrix (P_ij + P_ji = 1, P_ii = 1/2) and a similarity matrix."""
    g = torch.Generator().manual_seed(seed)
    upper = torch.rand(*batch, k, k, generator=g, dtype=torch.float64).triu(1)
    pref = upper + (1 - upper.transpose(-1, -2)).tril(-1)
    pref = pref + 0.5 * torch.eye(k, dtype=torch.float64)
    s = torch.rand(*batch, k, k, generator=g, dtype=torch.float64).triu(1)
    sim = s + s.transpose(-1, -2) + torch.eye(k, dtype=torch.float64)
    return pref, sim


def test_random_game_is_a_game():
    pref, sim = random_game(5, (3,))
    assert torch.allclose(pref + pref.transpose(-1, -2), torch.ones_like(pref))
    assert torch.allclose(pref.diagonal(dim1=-2, dim2=-1), torch.full((3, 5), 0.5, dtype=torch.float64))
    assert torch.equal(sim, sim.transpose(-1, -2))


def test_calibration_keeps_the_game_constant_sum_and_the_diagonal():
    pref, sim = random_game(6, (4,), seed=1)
    pc = calibrate(pref, sim, 0.2, 0.7)
    assert torch.allclose(pc + pc.transpose(-1, -2), torch.ones_like(pc), atol=1e-12)
    assert torch.allclose(pc.diagonal(dim1=-2, dim2=-1), torch.full((4, 6), 0.5, dtype=torch.float64))


def test_calibration_untouched_below_tau_low_and_half_above_tau_high():
    pref, sim = random_game(8, seed=2)
    pc = calibrate(pref, sim, 0.3, 0.6)
    low, high = sim <= 0.3, sim >= 0.6
    assert low.any() and high.any()
    assert torch.equal(pc[low], pref[low])
    assert torch.allclose(pc[high], torch.full_like(pc[high], 0.5))


def test_calibration_is_linear_and_monotone_between_the_thresholds():
    p = torch.tensor(0.9, dtype=torch.float64)
    sims = torch.linspace(0.3, 0.6, 31, dtype=torch.float64)
    pc = calibrate(p, sims, 0.3, 0.6)
    assert (pc[1:] < pc[:-1]).all()  # strictly falls from P to 1/2
    assert torch.allclose(pc, 0.5 + (1 - (sims - 0.3) / 0.3) * 0.4)
    # tau_low = 0, tau_high = 1: the plain linear gate Pc = 1/2 + (1 - S)(P - 1/2)
    pref, sim = random_game(5, seed=3)
    assert torch.allclose(calibrate(pref, sim, 0.0, 1.0), 0.5 + (1 - sim) * (pref - 0.5))


def test_gate_values():
    sim = torch.tensor([-0.5, 0.2, 0.45, 0.7, 1.0])
    assert torch.allclose(semantic_gate(sim, 0.2, 0.7), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_win_rates_include_the_diagonal():
    pref = torch.tensor([[0.5, 1.0, 1.0], [0.0, 0.5, 0.8], [0.0, 0.2, 0.5]])
    assert torch.allclose(win_rates(pref), torch.tensor([2.5 / 3, 1.3 / 3, 0.7 / 3]))
    batch, _ = random_game(4, (2, 3), seed=4)
    assert win_rates(batch).shape == (2, 3, 4)
    assert torch.allclose(win_rates(batch).sum(-1), torch.full((2, 3), 2.0, dtype=torch.float64))  # sum_i P_hat_i = K/2


def test_repulsion_loss_formula():
    g = torch.Generator().manual_seed(5)
    hw, hl = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    expected = [max(0.0, 1.2 - math.sqrt(sum((a / hw[i].norm() - b / hl[i].norm()) ** 2 for a, b in zip(hw[i], hl[i]))))
                for i in range(7)]
    assert torch.allclose(repulsion_loss(hw, hl, 1.2), torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert torch.equal(repulsion_loss(hw, -hw, 1.9), torch.zeros(7))  # distance 2 exceeds the margin
    assert torch.allclose(repulsion_loss(hw, 3 * hw, 0.5), torch.full((7,), 0.5))  # same direction: distance 0


def _inputs(seed=6, b=9):
    g = torch.Generator().manual_seed(seed)
    t = [(torch.randn(b, generator=g, dtype=torch.float64) * 20 - 100).requires_grad_() for _ in range(4)]
    ww, wl = torch.rand(b, generator=g, dtype=torch.float64) * 0.5 + 0.5, torch.rand(b, generator=g, dtype=torch.float64) * 0.5
    return t, ww, wl


@pytest.mark.parametrize("loss_type", ["sspo", "sppo", "sppo_hard", "dpo", "ipo"])
def test_each_loss_type_value_and_gradient(loss_type):
    (pw, pl, rw, rl), ww, wl = _inputs()
    beta = 0.05
    out = preference_loss(pw, pl, rw, rl, loss_type=loss_type, beta=beta, chosen_winrate=ww, rejected_winrate=wl)
    out.sum().backward()
    aw, al = (pw - rw).detach(), (pl - rl).detach()
    eta = 1 / beta
    if loss_type in ("sspo", "sppo"):
        tw, tl = eta * (ww - 0.5), eta * (wl - 0.5)
    elif loss_type == "sppo_hard":
        tw, tl = torch.full_like(aw, eta / 2), torch.full_like(al, -eta / 2)
    if loss_type in ("sspo", "sppo", "sppo_hard"):
        value, gw, gl = (aw - tw) ** 2 + (al - tl) ** 2, 2 * (aw - tw), 2 * (al - tl)
    elif loss_type == "dpo":
        z = beta * (aw - al)
        value = torch.log1p(torch.exp(-z))
        gw = -beta / (1 + torch.exp(z))
        gl = -gw
    else:
        d = aw - al - 1 / (2 * beta)
        value, gw, gl = d ** 2, 2 * d, -2 * d
    assert out.shape == (9,)
    assert torch.allclose(out.detach(), value)
    assert torch.allclose(pw.grad, gw) and torch.allclose(pl.grad, gl)
    assert torch.allclose(rw.grad, -gw) and torch.allclose(rl.grad, -gl)  # a = policy - reference


@pytest.mark.parametrize("loss_type", ["sspo", "sppo", "sppo_hard", "dpo", "ipo"])
def test_preference_terms_name_what_the_loss_is_made_of(loss_type):
    """The log-ratios and targets the loop logs are the loss's own: a = policy - reference, and the loss is
    zero where a meets the targets (SPPO types); dpo / ipo report the targets the win rates imply."""
    (pw, pl, rw, rl), ww, wl = _inputs(seed=10)
    beta = 0.05
    terms = preference_terms(pw, pl, rw, rl, loss_type=loss_type, beta=beta, chosen_winrate=ww, rejected_winrate=wl)
    assert torch.equal(terms["loss"], preference_loss(pw, pl, rw, rl, loss_type=loss_type, beta=beta,
                                                      chosen_winrate=ww, rejected_winrate=wl))
    assert torch.allclose(terms["logratio_chosen"], pw - rw) and torch.allclose(terms["logratio_rejected"], pl - rl)
    hard = loss_type == "sppo_hard"
    assert torch.allclose(terms["target_chosen"], torch.full_like(ww, 10.0) if hard else 20 * (ww - 0.5))
    assert torch.allclose(terms["target_rejected"], torch.full_like(wl, -10.0) if hard else 20 * (wl - 0.5))
    if loss_type in ("sspo", "sppo", "sppo_hard"):
        at = preference_terms(terms["target_chosen"], terms["target_rejected"], torch.zeros(9, dtype=torch.float64),
                              torch.zeros(9, dtype=torch.float64), loss_type=loss_type, beta=beta, chosen_winrate=ww,
                              rejected_winrate=wl)
        assert torch.allclose(at["loss"], torch.zeros(9, dtype=torch.float64))
    if loss_type in ("dpo", "ipo"):
        alone = preference_terms(pw, pl, rw, rl, loss_type=loss_type, beta=beta)
        assert alone["target_chosen"] is None and torch.equal(alone["loss"], terms["loss"])


def test_latent_distance_is_the_distance_repulsion_uses():
    g = torch.Generator().manual_seed(11)
    hw, hl = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    cos = torch.nn.functional.cosine_similarity(hw, hl, dim=-1)
    assert torch.allclose(latent_distance(hw, hl), (2 - 2 * cos).sqrt(), atol=1e-5)  # unit vectors: |u-v|^2 = 2 - 2cos
    assert torch.allclose(repulsion_loss(hw, hl, 1.3), torch.relu(1.3 - latent_distance(hw, hl)))


def test_sppo_hard_is_sppo_with_winrates_one_and_zero():
    (pw, pl, rw, rl), _, _ = _inputs(seed=7)
    one, zero = torch.ones(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)
    hard = preference_loss(pw, pl, rw, rl, loss_type="sppo_hard", beta=0.01)
    soft = preference_loss(pw, pl, rw, rl, loss_type="sppo", beta=0.01, chosen_winrate=one, rejected_winrate=zero)
    assert torch.allclose(hard, soft)


def test_sppo_hard_matches_trls_definition():
    # TRL DPOTrainer loss_type="sppo_hard": a = pi_w - ref_w, b = pi_l - ref_l, (a - 0.5/beta)^2 + (b + 0.5/beta)^2
    (pw, pl, rw, rl), _, _ = _inputs(seed=8)
    beta = 0.1
    a, b = pw - rw, pl - rl
    assert torch.allclose(preference_loss(pw, pl, rw, rl, loss_type="sppo_hard", beta=beta),
                          (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2)


def test_zero_at_the_target():
    w = torch.tensor([0.8]), torch.tensor([0.3])
    beta = 0.01  # eta = 100: targets 30 and -20
    z = torch.zeros(1)
    loss = preference_loss(torch.tensor([30.0]), torch.tensor([-20.0]), z, z, loss_type="sppo", beta=beta,
                           chosen_winrate=w[0], rejected_winrate=w[1])
    assert torch.allclose(loss, torch.zeros(1), atol=1e-8)


def test_bad_loss_type_and_missing_winrates():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(z, z, z, z, loss_type="kto", beta=0.1)
    with pytest.raises(ValueError, match="needs chosen_winrate"):
        preference_loss(z, z, z, z, loss_type="sspo", beta=0.1)


def test_loss_block_runs_alone():
    """The block between its markers needs nothing but torch and F: paste it into a fresh namespace."""
    import pathlib

    src = (pathlib.Path(__file__).parent.parent / "sspo.py").read_text()
    block = src[src.index("def semantic_gate"):src.index("# ===", src.index("def semantic_gate"))]
    namespace = {"torch": torch, "F": torch.nn.functional}
    exec(compile(block, "loss_block", "exec"), namespace)
    pref, sim = random_game(4, seed=9)
    assert torch.allclose(namespace["win_rates"](namespace["calibrate"](pref, sim, 0.1, 0.9)),
                          win_rates(calibrate(pref, sim, 0.1, 0.9)))
    assert namespace["choose_pair"](pref, sim, loss_type="sspo", tau_low=0.1, tau_high=0.9) == \
        choose_pair(pref, sim, loss_type="sspo", tau_low=0.1, tau_high=0.9)
    h = torch.randn(4, 8)
    args = (pref[0], pref[1], pref[2], pref[3], h, h.flip(0))
    assert torch.equal(namespace["objective"](*args, loss_type="ipo", beta=0.5)["loss"], objective(*args, loss_type="ipo", beta=0.5)["loss"])


def test_choose_pair_takes_the_argmax_and_argmin_of_the_loss_own_win_rates():
    pref, sim = random_game(5, seed=3)
    for loss in ("sspo", "sppo", "dpo"):
        rates = win_rates(calibrate(pref, sim, 0.3, 0.8) if loss == "sspo" else pref)
        w, l, rate_w, rate_l, gate = choose_pair(pref, sim, loss_type=loss, tau_low=0.3, tau_high=0.8)
        assert (w, l) == (int(rates.argmax()), int(rates.argmin())) and (rate_w, rate_l) == (float(rates[w]), float(rates[l]))
        g = semantic_gate(sim, 0.3, 0.8)
        assert gate == (pytest.approx(float((g.sum() - g.trace()) / 20)) if loss == "sspo" else 0.0)
    assert choose_pair(torch.full((3, 3), 0.5), torch.eye(3), loss_type="sspo", tau_low=0.3, tau_high=0.8) is None
    fully_similar = torch.ones(3, 3)  # every verdict gated to 1/2: nothing left to learn for sspo, all of it for sppo
    assert choose_pair(pref[:3, :3], fully_similar, loss_type="sspo", tau_low=0.3, tau_high=0.8) is None
    assert choose_pair(pref[:3, :3], fully_similar, loss_type="sppo", tau_low=0.3, tau_high=0.8) is not None


def test_calibrate_pair_is_calibrate_on_a_two_answer_game():
    pref = torch.tensor([[0.5, 0.9], [0.1, 0.5]], dtype=torch.float64)
    sim = torch.tensor([[1.0, 0.75], [0.75, 1.0]], dtype=torch.float64)
    rates = win_rates(calibrate(pref, sim, 0.6, 0.9))
    w, l, g = calibrate_pair(float(win_rates(pref)[0]), float(win_rates(pref)[1]), 0.75, 0.6, 0.9)
    assert (w, l) == pytest.approx((float(rates[0]), float(rates[1]))) and g == pytest.approx(0.5)


def test_objective_is_the_preference_term_plus_weighted_repulsion():
    torch.manual_seed(0)
    pw, pl, rw, rl = (torch.randn(6) * 3 for _ in range(4))
    hw, hl = torch.randn(6, 8), torch.randn(6, 8)
    ww, wl = torch.rand(6) * 0.5 + 0.5, torch.rand(6) * 0.5
    for loss, weight in (("sspo", None), ("sspo", 7.0), ("sppo", 7.0), ("dpo", None), ("ipo", 3.0)):
        out = objective(pw, pl, rw, rl, hw, hl, loss_type=loss, beta=0.1, chosen_winrate=ww, rejected_winrate=wl,
                        rep_weight=weight, rep_margin=1.5)
        lam = (50.0 if weight is None else weight) if loss == "sspo" else 0.0  # the default is 5 / beta
        assert lam == rep_weight_used(loss, 0.1, weight)
        pref = preference_loss(pw, pl, rw, rl, loss_type=loss, beta=0.1, chosen_winrate=ww, rejected_winrate=wl)
        assert torch.equal(out["loss_pref"], pref) and torch.equal(out["loss_rep"], repulsion_loss(hw, hl, 1.5))
        assert torch.equal(out["loss"], pref + lam * repulsion_loss(hw, hl, 1.5))
        assert torch.equal(out["latent_dist"], latent_distance(hw, hl))
