"""The DINO core in one process: loss, centre, EMA, schedules, one step, checkpoint round trip.
(The step's speed -- host syncs, fused optimizer, compile, kernel counts, the CUDA-graph step -- is in
tests/test_step_speed.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydino.config import load_config
from raydino.core.checkpoint import load_checkpoint, restore_state, save_checkpoint
from raydino.core.loss import DINOLoss, collapse_stats, koleo_loss
from raydino.core.model import DINOHead, build_student_teacher
from raydino.core.schedule import build_schedules, cosine_schedule, param_groups, scaled_lr
from raydino.core.step import build_train_state, ema_update, train_step

from helpers.core import random_crops, tiny_cfg

# ---------------------------------------------------------------- loss


def test_dino_loss_matches_hand_computation():
    torch.manual_seed(0)
    K, B, n_crops = 5, 3, 3
    temps = np.array([0.04])
    loss_fn = DINOLoss(K, n_crops, temps, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, K) * 0.1)
    center0 = loss_fn.center.clone()
    s = torch.randn(n_crops * B, K)
    t = torch.randn(2 * B, K)

    got = loss_fn(s, t, epoch=0)

    # by hand, pair by pair, sample by sample
    q = [[math.exp(((t[i * B + b] - center0[0]) / 0.04)[k].item()) for k in range(K)] for i in range(2) for b in range(B)]
    q = [[v / sum(row) for v in row] for row in q]
    total, n = 0.0, 0
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            pair = 0.0
            for b in range(B):
                logits = (s[v * B + b] / 0.1).tolist()
                m = max(logits)
                lse = m + math.log(sum(math.exp(x - m) for x in logits))
                pair += -sum(q[iq * B + b][k] * (logits[k] - lse) for k in range(K))
            total += pair / B
            n += 1
    assert n == 4  # 2 teacher views × 3 student views, minus the 2 same-view pairs
    assert got.item() == pytest.approx(total / n, rel=1e-5)

    # centre: c ← 0.9 c + 0.1 · mean(teacher outputs)
    expected_center = center0 * 0.9 + t.mean(0, keepdim=True) * 0.1
    assert torch.allclose(loss_fn.center, expected_center, atol=1e-6)


@pytest.mark.parametrize("n_crops", [2, 10])
def test_dino_loss_and_its_gradient_equal_the_pair_by_pair_loop(n_crops):
    # The loss sums every (teacher view, student view) pair in a few tensor ops; DINO's loop over the
    # pairs, in float64, is the reference for the value and for the gradient the student receives
    # (the loss computes in float32: hence the tolerances).
    torch.manual_seed(1)
    K, B = 64, 4
    loss_fn = DINOLoss(K, n_crops, np.array([0.04]), student_temp=0.1).double()
    loss_fn.center.copy_(torch.randn(1, K, dtype=torch.float64) * 0.1)
    s = torch.randn(n_crops * B, K, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2 * B, K, dtype=torch.float64)

    q = torch.softmax((t - loss_fn.center) / 0.04, dim=-1).chunk(2)
    logp = torch.log_softmax(s / 0.1, dim=-1).chunk(n_crops)
    pairs = [(-q[i] * logp[v]).sum(-1).mean() for i in range(2) for v in range(n_crops) if v != i]
    expected = torch.stack(pairs).mean()
    (expected_grad,) = torch.autograd.grad(expected, s)

    got = loss_fn(s, t, epoch=0, update_center=False)
    (got_grad,) = torch.autograd.grad(got, s)
    assert len(pairs) == 2 * (n_crops - 1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_koleo_is_minus_mean_log_nearest_neighbour_distance_and_spreads_features():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.6, 0.8]])
    u = F.normalize(x, dim=-1)
    d = torch.cdist(u, u) + torch.eye(4) * 10
    assert torch.allclose(koleo_loss(x), -torch.log(d.min(dim=1).values).mean(), atol=1e-5)
    # Gradient descent on it moves collapsed features apart.
    feats = (torch.tensor([[1.0, 0.0, 0.0]]) + 0.01 * torch.randn(8, 3, generator=torch.Generator().manual_seed(0))).requires_grad_()
    before = float(koleo_loss(feats.detach()))
    opt = torch.optim.SGD([feats], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        koleo_loss(feats).backward()
        opt.step()
    assert float(koleo_loss(feats.detach())) < before - 1.0


def test_koleo_weight_adds_the_regulariser_to_the_step():
    cfg = tiny_cfg("loss.koleo_weight=0")
    plain, reg = build_train_state(cfg, 10), build_train_state(tiny_cfg("loss.koleo_weight=0.5"), 10)
    m_plain, m_reg = train_step(plain, random_crops(cfg, 4)), train_step(reg, random_crops(cfg, 4))
    assert "koleo" not in m_plain and math.isfinite(m_reg["koleo"])
    assert m_reg["loss"] == pytest.approx(m_plain["loss"] + 0.5 * m_reg["koleo"], rel=1e-4)  # same init, same crops


def test_teacher_temperature_warmup_then_constant():
    cfg = tiny_cfg("loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07", "loss.warmup_teacher_temp_epochs=3")
    s = build_schedules(cfg, steps_per_epoch=5, world_size=1)
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[2] == pytest.approx(0.07)
    assert all(t == pytest.approx(0.07) for t in s.teacher_temp[3:])


def test_collapse_stats_flags_uniform_and_one_hot():
    K = 128
    uniform = torch.full((8, K), 1 / K)
    assert collapse_stats(uniform).collapse == "uniform"
    one_hot = F.one_hot(torch.zeros(8, dtype=torch.long), K).float()
    assert collapse_stats(one_hot).collapse == "one-hot"
    healthy = F.one_hot(torch.arange(8), K).float() * 0.9 + 0.1 / K
    assert collapse_stats(healthy).collapse is None


# ---------------------------------------------------------------- schedules


def test_cosine_schedule_with_warmup():
    s = cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=5)
    assert len(s) == 20
    assert s[0] == 0.0 and s[5] == pytest.approx(1.0)
    assert np.all(np.diff(s[:6]) > 0) and np.all(np.diff(s[5:]) <= 0)
    assert s[-1] == pytest.approx(0.1, abs=0.01)


def test_lr_scales_with_global_batch_and_dino_defaults():
    cfg = load_config("vits16-paper")
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    sch = build_schedules(cfg, steps_per_epoch=10, world_size=4)
    peak = 5e-4 * cfg.train.batch_size * 4 / 256
    assert sch.lr.max() == pytest.approx(peak, rel=1e-6)
    assert sch.weight_decay[0] == pytest.approx(0.04) and sch.weight_decay[-1] == pytest.approx(0.4, rel=0.01)
    assert sch.momentum[0] == pytest.approx(0.996) and sch.momentum[-1] == pytest.approx(1.0, abs=1e-4)


def test_no_weight_decay_on_biases_and_norms():
    head = DINOHead(16, 8, 32, 4, 3)
    decay, no_decay = param_groups(head)
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


# ---------------------------------------------------------------- model


def test_head_shape_and_frozen_gain():
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, nlayers=3, norm_last_layer=True)
    out = head(torch.randn(4, 32))
    assert out.shape == (4, 100)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "resnet18"])
def test_student_takes_both_resolutions_teacher_only_globals(arch):
    cfg = tiny_cfg(f"model.arch={arch}")
    student, teacher = build_student_teacher(cfg)
    crops = [c.float() for c in random_crops(cfg, 2)]
    assert student(crops).shape == (2 * len(crops), cfg.model.out_dim)
    assert teacher(crops[:2]).shape == (4, cfg.model.out_dim)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_has_no_stochastic_depth_student_keeps_it():
    # Regression: the teacher was a deepcopy of the student, DropPath included, and runs in train
    # mode, so its targets were randomly thinned.  DINO's teacher has no stochastic depth.
    cfg = tiny_cfg("model.drop_path_rate=0.5")
    student, teacher = build_student_teacher(cfg)
    student.train(), teacher.train()
    x = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        assert torch.equal(teacher(x), teacher(x))
        torch.manual_seed(0)
        s1 = student(x)
        torch.manual_seed(1)
        assert not torch.allclose(s1, student(x))
    assert student.state_dict().keys() == teacher.state_dict().keys()


def test_step_budget_inside_first_epoch_still_trains_the_last_layer():
    # Regression: freezing counted in epochs only, so a step budget shorter than the first epoch
    # (a tune trial, a smoke run) kept the last layer frozen for the whole run.
    cfg = tiny_cfg("optim.freeze_last_layer_epochs=1", "train.max_steps=4", "train.epochs=1")
    state = build_train_state(cfg, steps_per_epoch=100)
    assert state.schedules.total_steps == 4 and state.schedules.freeze_last_layer_steps == 2
    v = state.student.head.last_layer.parametrizations.weight.original1
    before = v.detach().clone()
    for i in range(2):
        train_step(state, random_crops(cfg, 4, seed=i))
    assert torch.equal(v, before) and state.epoch == 0
    train_step(state, random_crops(cfg, 4, seed=2))
    assert not torch.equal(v, before)
    # without a budget the freeze lasts exactly the first epoch, as in DINO
    full = build_schedules(tiny_cfg("optim.freeze_last_layer_epochs=1"), steps_per_epoch=100, world_size=1)
    assert full.freeze_last_layer_steps == 100


def test_batchnorm_model_trains_under_torch_distributed_on_cpu():
    # Regression: SyncBatchNorm (model.sync_batchnorm, on by default) raises in its first forward on
    # CPU tensors, so every CPU DDP run of a ResNet or a BN head failed.  A one-process gloo group
    # reaches the same code path as the two-worker demo.
    import torch.distributed as dist

    cfg = tiny_cfg("model.head_use_bn=true", "model.sync_batchnorm=true")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning, match="sync_batchnorm"):
            state = build_train_state(cfg, steps_per_epoch=10, world_size=2)
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in state.student.modules())
        metrics = train_step(state, random_crops(cfg, 4))
        assert math.isfinite(metrics["loss"])
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- engine


def test_teacher_gets_no_gradients_and_ema_matches_formula():
    cfg = tiny_cfg()
    state = build_train_state(cfg, steps_per_epoch=10)
    teacher_before = [p.detach().clone() for p in state.teacher.parameters()]
    m = state.schedules.momentum[0]
    train_step(state, random_crops(cfg, 4))
    assert all(p.grad is None for p in state.teacher.parameters())
    for tb, ta, s in zip(teacher_before, state.teacher.parameters(), state.student.parameters()):
        assert torch.allclose(ta, m * tb + (1 - m) * s.detach(), atol=1e-6)


def test_ema_update_formula_directly():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    ta = [p.detach().clone() for p in a.parameters()]
    ema_update(a, b, 0.9)
    for t0, t1, s in zip(ta, a.parameters(), b.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s.detach())


def test_last_layer_frozen_in_first_epoch_only():
    cfg = tiny_cfg("optim.freeze_last_layer_epochs=1", "model.norm_last_layer=false")
    state = build_train_state(cfg, steps_per_epoch=10)
    v = state.student.head.last_layer.parametrizations.weight.original1
    before = v.detach().clone()
    train_step(state, random_crops(cfg, 4))
    assert torch.equal(v, before)
    state.epoch = 1
    train_step(state, random_crops(cfg, 4, seed=1))
    assert not torch.equal(v, before)


def test_gradient_clipping_per_parameter_tensor():
    from raydino.core.step import clip_gradients

    lin = torch.nn.Linear(4, 4)
    lin.weight.grad = torch.full((4, 4), 10.0)
    lin.bias.grad = torch.full((4,), 0.1)
    clip_gradients(lin, 3.0)
    assert lin.weight.grad.norm() == pytest.approx(3.0, rel=1e-4)
    assert lin.bias.grad.norm() == pytest.approx(0.2, rel=1e-4)  # below the limit: untouched


def test_non_finite_loss_stops_with_step_number():
    from raydino.core.step import NonFiniteLossError

    cfg = tiny_cfg()
    state = build_train_state(cfg, steps_per_epoch=10)
    crops = [c.float() for c in random_crops(cfg, 2)]
    crops[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 0"):
        train_step(state, crops)


# ---------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip_then_one_step_is_bit_identical(tmp_path):
    cfg = tiny_cfg()
    batches = [random_crops(cfg, 4, seed=i) for i in range(3)]
    a = build_train_state(cfg, steps_per_epoch=10)
    for b in batches[:2]:
        train_step(a, b)
    save_checkpoint(a, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "state.pt").exists() and (tmp_path / "ckpt" / "config.yaml").exists()
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    train_step(a, batches[2])

    b = build_train_state(cfg, steps_per_epoch=10)
    restore_state(b, load_checkpoint(tmp_path / "ckpt"))
    assert b.step == 2
    train_step(b, batches[2])
    for pa, pb in zip(a.student.parameters(), b.student.parameters()):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.teacher.parameters(), b.teacher.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(a.loss_fn.center, b.loss_fn.center)
    assert a.step == b.step == 3


def test_a_mid_epoch_resume_trains_the_epochs_tail_not_its_head_again(monkeypatch):
    """Resumed at step 6 of 4-step epochs (epoch 1, 2 steps done): the loop passes over that epoch's first
    two batches and trains its last two, then all of epoch 2; no batch is trained twice, none dropped."""
    import raydino.core.loop as loop

    cfg = load_config("smoke", ["train.epochs=3"])
    state = build_train_state(cfg, steps_per_epoch=4)
    state.step, state.epoch = 6, 1
    trained: list[tuple[int, int]] = []

    def fake_step(state, crops, defer=False):  # records which batch it was given; the real step is tested above
        trained.append((state.epoch, int(crops[0].flatten()[0])))
        state.step += 1
        return {"loss": 1.0}

    monkeypatch.setattr(loop, "train_step", fake_step)

    def epoch_batches(epoch):  # batch i of every epoch carries i in its first pixel
        return ([torch.full((2, 3, 8, 8), i, dtype=torch.uint8)] for i in range(4))

    loop.fit(state, epoch_batches)
    assert trained == [(1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert (state.step, state.epoch) == (12, 3)
