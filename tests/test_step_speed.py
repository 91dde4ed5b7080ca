"""The DINO step's speed on any machine (issue 14): no host syncs in a deferred step, the fused
optimizer, torch.compile, FLOP counts, fewer kernel launches per step, and the whole step as one CUDA
graph -- each checked to train as the plain step does.  The CUDA-only checks are tests/test_gpu.py."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from timm.layers import DropPath

from raydino.config import load_config
from raydino.core.checkpoint import load_checkpoint, restore_state, save_checkpoint
from raydino.core.droppath import BatchedDropPath, batch_drop_paths
from raydino.core.flops import KernelOpCounter
from raydino.core.loss import DINOLoss
from raydino.core.model import DINOHead, build_student_teacher
from raydino.core.schedule import build_schedules
from raydino.core.step import build_train_state, train_step

from helpers.core import graph_body_vs_ddp_worker, graph_cfg, random_crops, tiny_cfg

# ---------------------------------------------------------------- issue 14: syncs, fused optimizer, compile, FLOPs


def _snapshot(state):
    return {
        "student": [p.detach().clone() for p in state.student.parameters()],
        "teacher": [p.detach().clone() for p in state.teacher.parameters()],
        "center": state.loss_fn.center.clone(),
        "opt": [{k: v.clone() for k, v in s.items()} for s in state.optimizer.state.values()],
    }


def _same(a, b) -> bool:
    same = all(torch.equal(x, y) for part in ("student", "teacher") for x, y in zip(a[part], b[part]))
    same &= torch.equal(a["center"], b["center"]) and len(a["opt"]) == len(b["opt"])
    return same and all(torch.equal(x[k], y[k]) for x, y in zip(a["opt"], b["opt"]) for k in x)


def test_optimizer_is_fused_on_cuda_and_foreach_on_cpu_unless_set():
    from raydino.core.step import use_fused_optimizer

    cfg = tiny_cfg()
    assert use_fused_optimizer(cfg, torch.device("cuda")) and not use_fused_optimizer(cfg, torch.device("cpu"))
    assert use_fused_optimizer(tiny_cfg("optim.fused=true"), torch.device("cpu"))
    assert not use_fused_optimizer(tiny_cfg("optim.fused=false"), torch.device("cuda"))
    assert use_fused_optimizer(tiny_cfg("train.cuda_graph=true", "model.head_use_bn=false"), torch.device("cpu"))  # the graph step needs it
    assert all(g["foreach"] and not g["fused"] for g in build_train_state(cfg, steps_per_epoch=10).optimizer.param_groups)
    state = build_train_state(tiny_cfg("optim.fused=true"), steps_per_epoch=10)
    assert all(g["fused"] for g in state.optimizer.param_groups)
    sgd = build_train_state(tiny_cfg("optim.fused=true", "optim.optimizer=sgd"), steps_per_epoch=10)
    assert isinstance(sgd.optimizer, torch.optim.SGD) and all(g["fused"] for g in sgd.optimizer.param_groups)


def test_fused_adamw_steps_match_foreach_adamw():
    batches = [random_crops(tiny_cfg(), 4, seed=i) for i in range(2)]
    params = {}
    for fused in ("true", "false"):
        state = build_train_state(tiny_cfg(f"optim.fused={fused}"), steps_per_epoch=10)
        for b in batches:
            train_step(state, b)
        params[fused] = [p.detach().clone() for p in state.student.parameters()]
    for a, b in zip(params["true"], params["false"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_deferred_steps_match_plain_steps():
    from raydino.core.step import check_finite, materialize

    cfg = tiny_cfg("optim.fused=true")
    batches = [random_crops(cfg, 4, seed=i) for i in range(3)]
    plain, deferred = build_train_state(cfg, steps_per_epoch=10), build_train_state(cfg, steps_per_epoch=10)
    for b in batches:
        m_plain = train_step(plain, b)
        m_def = train_step(deferred, b, defer=True)
        assert isinstance(m_def["loss"], torch.Tensor)  # nothing read on the host
        assert materialize(m_def)["loss"] == pytest.approx(m_plain["loss"], rel=1e-5)
    check_finite(deferred)  # no error: every loss was finite
    for a, b in zip(plain.teacher.parameters(), deferred.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(plain.loss_fn.center, deferred.loss_fn.center, atol=1e-7)


def test_deferred_non_finite_step_is_never_applied_and_raises_with_its_step_at_the_check():
    from raydino.core.step import NonFiniteLossError, check_finite

    cfg = tiny_cfg("optim.fused=true")
    state = build_train_state(cfg, steps_per_epoch=10)
    train_step(state, random_crops(cfg, 2), defer=True)  # step 0: fine
    good = _snapshot(state)
    bad = [c.float() for c in random_crops(cfg, 2, seed=1)]
    bad[0][0, 0, 0, 0] = float("nan")
    train_step(state, bad, defer=True)  # step 1: non-finite, but no host sync, so no error yet
    train_step(state, random_crops(cfg, 2, seed=2), defer=True)  # step 2: finite, skipped all the same
    assert state.step == 3
    # Neither weights nor teacher, centre or optimizer moments and step counts moved after step 0.
    assert _same(good, _snapshot(state))
    with pytest.raises(NonFiniteLossError, match="step 1") as err:
        check_finite(state)
    assert err.value.step == 1 and not math.isfinite(err.value.value)


def test_fit_stops_at_the_next_check_with_the_first_non_finite_step_and_saves_nothing_after_it():
    from raydino.core.loop import LoopHooks, fit
    from raydino.core.step import NonFiniteLossError

    cfg = tiny_cfg("optim.fused=true", "train.log_every=4", "train.checkpoint_every=3", "train.epochs=1")
    state = build_train_state(cfg, steps_per_epoch=8)
    saved, logged = [], []

    def batches(epoch):
        for i in range(8):
            crops = [c.float() for c in random_crops(cfg, 2, seed=i)]
            if i == 4:  # step 4 (0-based) is non-finite; the next check is the checkpoint after step 6
                crops[0][0, 0, 0, 0] = float("nan")
            yield crops

    hooks = LoopHooks(on_log=lambda s, m: logged.append(s.step), on_checkpoint=lambda s, m, end: saved.append(s.step))
    with pytest.raises(NonFiniteLossError, match="step 4"):
        fit(state, batches, hooks)
    assert saved == [3] and logged == [4]  # the check before the checkpoint after step 6 stopped it
    assert state.step == 6


def test_checkpoint_follows_names_exactly_the_steps_fit_checkpoints_after():
    """The preemption hook saves its own checkpoint only where `fit` will not save one at the same step."""
    from raydino.core.loop import LoopHooks, checkpoint_follows, fit

    # 7 steps/epoch, 2 epochs: checkpoints every 3 steps (3, 6, 9, 12) and at the epoch ends (7, 14).
    cfg = tiny_cfg("train.log_every=1", "train.checkpoint_every=3", "train.epochs=2")
    state = build_train_state(cfg, steps_per_epoch=7)
    follows, saved = [], []
    hooks = LoopHooks(
        on_log=lambda s, m: follows.append(s.step) if checkpoint_follows(s) else None, on_checkpoint=lambda s, m, end: saved.append(s.step)
    )
    fit(state, lambda epoch: (random_crops(cfg, 2, seed=epoch * 7 + i) for i in range(7)), hooks)
    assert saved == follows == [3, 6, 7, 9, 12, 14]


def test_clip_gradients_reads_nothing_on_the_host_and_returns_the_norms():
    from raydino.core.step import clip_gradients

    lin = torch.nn.Linear(4, 4)
    lin.weight.grad = torch.full((4, 4), 10.0)
    lin.bias.grad = torch.full((4,), 0.1)
    norms = clip_gradients(lin, 3.0)
    assert isinstance(norms, torch.Tensor) and norms.tolist() == pytest.approx([40.0, 0.2], rel=1e-5)
    assert torch.equal(lin.bias.grad, torch.full((4,), 0.1))  # below the limit: bit for bit untouched


def test_bf16_autocast_loss_within_two_percent_of_fp32_on_the_same_weights():
    """CPU bf16 autocast, the same weights and crops, with the head's last layer in bf16 and in fp32."""
    from raydino.core.step import forward_loss

    cfg = tiny_cfg("model.out_dim=4096", "loss.teacher_temp=0.04")
    state = build_train_state(cfg, steps_per_epoch=10)
    crops = random_crops(cfg, 8)
    fp32 = forward_loss(state, crops)
    for fp32_logits in (False, True):
        state.student.head.fp32_last_layer = state.teacher.head.fp32_last_layer = fp32_logits
        assert forward_loss(state, crops, torch.bfloat16) == pytest.approx(fp32, rel=0.02)
    assert forward_loss(state, crops) == fp32  # nothing in the state changed


def test_head_keeps_its_last_layer_in_fp32_under_autocast():
    head = DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8, fp32_last_layer=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(torch.randn(4, 16)).dtype == torch.float32
        head.fp32_last_layer = False
        assert head(torch.randn(4, 16)).dtype == torch.bfloat16


def test_vit_attention_is_fused():
    from raydino.core.model import fused_attention

    student, _ = build_student_teacher(tiny_cfg())
    assert fused_attention(student) is True  # timm calls F.scaled_dot_product_attention
    resnet, _ = build_student_teacher(tiny_cfg("model.arch=resnet18"))
    assert fused_attention(resnet) is None


def test_larger_batch_scales_the_learning_rate_linearly():
    """DINO's rule: optim.lr is per 256 images of global batch, so twice the batch per GPU doubles the peak lr."""
    s64 = build_schedules(tiny_cfg("train.batch_size=64", "optim.warmup_epochs=1"), steps_per_epoch=10, world_size=1)
    s128 = build_schedules(tiny_cfg("train.batch_size=128", "optim.warmup_epochs=1"), steps_per_epoch=10, world_size=1)
    s128x2 = build_schedules(tiny_cfg("train.batch_size=128", "optim.warmup_epochs=1"), steps_per_epoch=10, world_size=2)
    assert s128.lr.max() == pytest.approx(2 * s64.lr.max()) and s128x2.lr.max() == pytest.approx(4 * s64.lr.max())
    assert s64.lr.max() == pytest.approx(tiny_cfg().optim.lr * 64 / 256)


def test_compiled_networks_keep_their_state_dict_and_give_the_eager_loss():
    """The compile switch's wiring, with torch.compile's eager backend (inductor itself is tested on CUDA in
    test_gpu: compiling takes a minute on this CPU)."""
    from raydino.core.step import compile_networks

    cfg = tiny_cfg()
    eager, compiled = build_train_state(cfg, steps_per_epoch=10), build_train_state(cfg, steps_per_epoch=10)
    compile_networks(compiled.student, compiled.teacher, backend="eager")
    assert compiled.student.state_dict().keys() == eager.student.state_dict().keys()
    crops = random_crops(cfg, 4)
    for _ in range(2):
        assert train_step(compiled, crops)["loss"] == pytest.approx(train_step(eager, crops)["loss"], rel=1e-5)


def test_a_cuda_graph_compile_mode_starts_a_graph_iteration_every_step(monkeypatch):
    """`train.compile_mode=reduce-overhead` (CUDA graphs): each step tells torch a new iteration begins, so
    the graphs may reuse last step's output memory; other modes never call it.  The mode itself reaches
    torch.compile (inductor on CUDA; on this CPU the eager backend runs the same wiring)."""
    import torch

    import raydino.core.step as step

    with pytest.raises(ValueError, match="compile_mode"):
        tiny_cfg("train.compile_mode=fast")
    calls = []
    real = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1) or real())
    crops = random_crops(tiny_cfg(), 2)
    seen = []  # what build_train_state asks torch.compile for (compiling for real takes minutes here)
    monkeypatch.setattr(step, "compile_networks", lambda student, teacher, **options: seen.append(options))
    for mode, expected in (("default", 0), ("max-autotune-no-cudagraphs", 0), ("reduce-overhead", 2)):
        seen.clear()
        state = build_train_state(tiny_cfg("train.compile=true", f"train.compile_mode={mode}"), steps_per_epoch=10)
        assert seen == [{"mode": mode}]
        calls.clear()
        for _ in range(2):
            train_step(state, crops)
        assert len(calls) == expected, mode
    eager = build_train_state(tiny_cfg("train.compile_mode=reduce-overhead"), steps_per_epoch=10)  # compile off: no graphs
    calls.clear()
    train_step(eager, crops)
    assert calls == []


def _analytic_vit_forward_flops(backbone, size: int, batch: int) -> float:
    """2 FLOPs per multiply-add: patch embedding, per block qkv + proj + MLP (24 N D^2) and attention (4 N^2 D)."""
    d, p = backbone.embed_dim, backbone.patch_embed.patch_size[0]
    patches = (size // p) ** 2
    n = patches + 1
    per_block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * backbone.blocks[0].mlp.fc1.out_features + 4 * n * n * d
    return batch * (2 * patches * 3 * p * p * d + len(backbone.blocks) * per_block)


def _analytic_head_flops(cfg, rows: int) -> float:
    m = cfg.model
    dims = [192] + [m.head_hidden_dim] * (m.head_layers - 1) + [m.head_bottleneck_dim, m.out_dim]
    return rows * sum(2 * a * b for a, b in zip(dims, dims[1:]))


def test_step_flops_match_the_analytic_count_and_scale_with_the_batch():
    from raydino.core.flops import peak_tflops, step_flops

    cfg = tiny_cfg("loss.koleo_weight=0")  # ViT-Tiny (D 192), 32 px globals, 16 px locals
    student, _ = build_student_teacher(cfg)
    a, batch = cfg.augment, 8
    counted = step_flops(cfg, batch)
    teacher = _analytic_vit_forward_flops(student.backbone, a.global_crop_size, 2 * batch) + _analytic_head_flops(cfg, 2 * batch)
    student_fwd = (
        teacher
        + _analytic_vit_forward_flops(student.backbone, a.local_crop_size, a.n_local_crops * batch)
        + _analytic_head_flops(cfg, a.n_local_crops * batch)
    )
    assert counted["teacher_forward"] == pytest.approx(teacher, rel=0.01)
    assert counted["student_forward"] == pytest.approx(student_fwd, rel=0.01)
    # backward: twice the forward, less the patch embedding's gradient w.r.t. the (constant) crops
    assert 1.9 * student_fwd < counted["student_backward"] <= 2 * student_fwd
    assert step_flops(cfg, 2 * batch)["total"] == 2 * counted["total"]
    # real tensors on the CPU count the same up to how the CPU attention kernels are registered (0.4 % here)
    assert step_flops(cfg, batch, device="cpu")["total"] == pytest.approx(counted["total"], rel=0.01)
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some GPU") is None


# ---------------------------------------------------------------- issue 14: fewer kernels per step (a host-bound GPU step)


class _Branches(torch.nn.Module):
    """Each output row is one stochastic-depth branch applied to ones: its per-sample multiplier."""

    def __init__(self, probs):
        super().__init__()
        self.paths = torch.nn.ModuleList(DropPath(p) for p in probs)

    def forward(self, x):
        return torch.stack([dp(x) for dp in self.paths])


def test_batched_drop_paths_keep_timms_distribution_with_one_draw_per_forward():
    probs = [0.1, 0.5, 0.8]
    net = _Branches(probs)
    assert batch_drop_paths(net) == 3 and all(isinstance(m, BatchedDropPath) for m in net.paths)
    torch.manual_seed(0)
    n = 6000
    with KernelOpCounter() as ops:
        out = net(torch.ones(n, 1))[..., 0]
    assert ops.by_name["bernoulli"] == 1  # timm's DropPath: one bernoulli_ per branch
    for i, p in enumerate(probs):
        kept = out[i] != 0
        assert torch.all(out[i][kept] == torch.tensor(1 / (1 - p)))  # kept samples scaled by 1/keep
        assert abs((~kept).float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    # independent across branches (the 0.1 and 0.5 branches both drop ~5 % of samples) and forwards
    both = ((out[0] == 0) & (out[1] == 0)).float().mean().item()
    assert abs(both - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)
    again = net(torch.ones(n, 1))[..., 0]
    assert 0.4 < (again[1] != out[1]).float().mean().item() < 0.6
    # the branch's dtype (bf16 under autocast), the batch size of each forward, identity in eval mode
    assert net(torch.ones(5, 1, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert net(torch.ones(7, 2)).shape == (3, 7, 2)
    net.eval()
    assert torch.equal(net(torch.ones(9, 1)), torch.ones(3, 9, 1))


def test_the_student_draws_its_stochastic_depth_once_per_forward_and_compiled_ones_keep_timms():
    cfg = tiny_cfg("model.drop_path_rate=0.2")
    student, teacher = build_student_teacher(cfg)
    n_blocks = len(student.backbone.blocks)
    assert sum(isinstance(m, BatchedDropPath) for m in student.modules()) == 2 * (n_blocks - 1)  # block 0: rate 0
    assert all(m.drop_prob == 0 for m in teacher.modules() if isinstance(m, BatchedDropPath))
    with KernelOpCounter() as ops, torch.no_grad():
        student.train()([torch.randn(2, 3, 32, 32)])
    assert ops.by_name["bernoulli"] == 1
    compiled_student, _ = build_student_teacher(tiny_cfg("model.drop_path_rate=0.2", "train.compile=true"))
    assert not any(isinstance(m, BatchedDropPath) for m in compiled_student.modules())


def test_kernel_op_counter_counts_what_runs_a_kernel_backward_and_casts_included():
    from raydino.core.flops import KernelOpCounter

    x = torch.randn(4, 3, requires_grad=True)
    with KernelOpCounter() as ops:
        y = x.view(3, 4).t().contiguous()  # two views (nothing runs), one copy (clone)
        (y * 2).sum().backward()  # mul, sum; backward: ones_like, expand (a view), mul, clone
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.mm(x, x.t())  # autocast casts both arguments (the transpose is not a leaf: not cached)
    assert ops.by_name == {"clone": 2, "mul": 2, "sum": 1, "ones_like": 1, "_to_copy": 2, "mm": 1}


def test_the_dino_loss_launches_as_many_kernels_for_ten_crops_as_for_four():
    # The pairs are summed in a few tensor ops: DINO's loop grew by ~10 ops (forward and backward)
    # with every local crop, kernel launches a GPU waited for.
    from raydino.core.flops import KernelOpCounter

    totals = []
    for n_crops in (4, 10):
        loss_fn = DINOLoss(32, n_crops, np.array([0.04]))
        s = torch.randn(n_crops * 3, 32, requires_grad=True)
        with KernelOpCounter() as ops:
            loss_fn(s, torch.randn(6, 32), epoch=0, update_center=False).backward()
        totals.append(ops.total)
    assert totals[0] == totals[1] < 60


def test_the_teachers_bf16_weight_copy_gives_its_autocast_outputs_bit_for_bit_with_fewer_casts():
    from raydino.core.castcopy import CastWeightsCopy
    from raydino.core.flops import KernelOpCounter

    _, teacher = build_student_teacher(tiny_cfg())
    x = [torch.randn(3, 3, 32, 32)]
    copy_ = CastWeightsCopy(teacher, torch.bfloat16)
    for _ in range(2):  # the second time after the teacher's weights moved (an EMA step)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with KernelOpCounter() as direct:
                expected = teacher(x)
            module = copy_.refreshed()
            with KernelOpCounter() as via_copy:
                got = module(x)
        assert torch.equal(got, expected)
        assert via_copy.by_name["_to_copy"] < direct.by_name["_to_copy"] - 2 * len(teacher.backbone.blocks)
        with torch.no_grad():
            for p in teacher.parameters():
                p.mul_(0.9).add_(0.01)
    # only Linear/Conv weights are copies; the rest (LayerNorm, position embedding) is the teacher's own
    assert copy_.module.backbone.pos_embed is teacher.backbone.pos_embed
    assert copy_.module.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert copy_.module.head.last_layer.parametrizations.weight.original1 is teacher.head.last_layer.parametrizations.weight.original1


def test_the_bf16_weight_copy_shares_batchnorm_statistics_with_the_teacher():
    from raydino.core.castcopy import CastWeightsCopy

    _, teacher = build_student_teacher(tiny_cfg("model.arch=resnet18"))
    teacher.train()
    before = teacher.backbone.bn1.running_mean.clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        CastWeightsCopy(teacher, torch.bfloat16).refreshed()([torch.randn(4, 3, 32, 32) + 3])
    assert not torch.equal(teacher.backbone.bn1.running_mean, before)  # the copy's forward updated the teacher's


def test_a_bf16_step_through_the_teachers_weight_copy_trains_exactly_as_through_the_teacher(monkeypatch):
    import raydino.core.step as step_mod

    cfg = tiny_cfg("train.precision=bf16", "optim.fused=true")
    batches = [random_crops(cfg, 4, seed=i) for i in range(2)]
    results = []
    for use_copy in (True, False):
        if not use_copy:
            monkeypatch.setattr(step_mod, "teacher_for_forward", lambda state, dtype: state.teacher)
        state = build_train_state(cfg, steps_per_epoch=10)
        losses = [train_step(state, b)["loss"] for b in batches]
        assert (state.teacher_cast is not None) == use_copy
        results.append((losses, [p.detach().clone() for p in state.teacher.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_fewer_launches_cuts_the_kernels_of_a_bf16_step():
    from raydino.core.flops import KernelOpCounter

    counts, losses = {}, {}
    for flag in ("true", "false"):
        cfg = tiny_cfg("train.precision=bf16", "optim.fused=true", "model.drop_path_rate=0.1", f"train.fewer_launches={flag}")
        state = build_train_state(cfg, steps_per_epoch=10)
        crops = random_crops(cfg, 2)
        train_step(state, crops, defer=True)
        with KernelOpCounter() as ops:
            losses[flag] = train_step(state, crops, defer=True)["loss"]
        counts[flag] = ops
    blocks = len(build_student_teacher(tiny_cfg())[0].backbone.blocks)
    # per student forward (2): 2 x (blocks - 1) bernoulli_ and div_ become one draw; per step the
    # teacher's ~4 Linear weights and biases per block are no longer cast
    assert counts["true"].by_name["bernoulli"] == 2 and counts["false"].by_name["bernoulli_"] == 4 * (blocks - 1)
    assert counts["false"].by_name["_to_copy"] - counts["true"].by_name["_to_copy"] >= 8 * blocks
    assert counts["false"].total - counts["true"].total >= 12 * blocks
    assert all(torch.isfinite(v) for v in losses.values())


def test_a_one_rank_group_steps_without_collectives():
    # One GPU under Ray Train is a one-rank group: the centre's and the finite flag's all-reduces
    # would each be a launch (and an NCCL call in a CUDA graph) with nothing to reduce.
    import torch.distributed as dist

    cfg = tiny_cfg("optim.fused=true")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        state = build_train_state(cfg, steps_per_epoch=10)
        crops = random_crops(cfg, 2)
        train_step(state, crops, defer=True)
        with KernelOpCounter() as ops:
            out = train_step(state, crops, defer=True)
    finally:
        dist.destroy_process_group()
    assert not [name for name in ops.by_name if "allreduce" in name], ops.by_name
    assert torch.isfinite(out["loss"]) and state.loss_fn.center.abs().sum() > 0


# ---------------------------------------------------------------- issue 14: the whole step as one CUDA graph


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_graph_steps_body_trains_as_the_deferred_train_step(precision):
    # The body a CUDA graph captures, run eagerly here: the schedules, the step number and the teacher
    # temperature read from device memory, the weight decay applied outside the fused AdamW, the
    # gradients in one flat buffer.  It must train as train_step(defer=True) does.
    from raydino.core.graphstep import GraphedStep

    cfg = graph_cfg(f"train.precision={precision}", "optim.weight_decay=0.1", "optim.weight_decay_end=0.3")
    batches = [random_crops(cfg, 4, seed=i) for i in range(4)]
    plain, graphed = build_train_state(cfg, steps_per_epoch=4), build_train_state(cfg, steps_per_epoch=4)
    step = GraphedStep(graphed, batches[0], capture=False)
    for i, b in enumerate(batches):
        torch.manual_seed(100 + i)  # the same stochastic-depth draws on both sides
        a = train_step(plain, b, defer=True)
        torch.manual_seed(100 + i)
        g = step(b)
        assert g["loss"].item() == pytest.approx(a["loss"].item(), rel=1e-5), i
        assert g["lr"] == a["lr"] and g["weight_decay"] == a["weight_decay"] and g["momentum"] == a["momentum"]
        assert g["grad_norm_max"].item() == pytest.approx(float(a["grad_norm_max"]), rel=1e-4)
    assert graphed.step == plain.step == 4
    for net in ("student", "teacher"):
        for (name, p), q in zip(getattr(plain, net).named_parameters(), getattr(graphed, net).parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=f"{net}.{name}")
    torch.testing.assert_close(graphed.loss_fn.center, plain.loss_fn.center)
    # every gradient lives in the flat buffer the graph all-reduces
    lo, size = step.flat_grad.data_ptr(), step.flat_grad.numel() * step.flat_grad.element_size()
    assert all(lo <= p.grad.data_ptr() < lo + size for p in graphed.student.parameters() if p.requires_grad)


def test_on_two_ranks_the_graph_steps_body_all_reduces_and_trains_as_a_ddp_step(tmp_path):
    # What only runs with more than one worker: the body's own gradient all-reduce and averaging (DDP's
    # hooks must stay idle once it takes over from DDP steps), and the centre's and finite flag's
    # all-reduces.  Two gloo processes, each on its own crops.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(graph_body_vs_ddp_worker, args=(2, port, str(tmp_path), 4), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, result in enumerate(ranks):
        plain, graphed = result["plain"], result["graphed"]
        assert graphed["loss"] == pytest.approx(plain["loss"], rel=1e-5), r
        # pre-clip norms: a sum of the ranks' gradients instead of their mean would double them
        assert graphed["grad_norm_max"] == pytest.approx(plain["grad_norm_max"], rel=1e-4), r
        for part in ("student", "teacher"):
            for p, q in zip(plain[part], graphed[part]):
                torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=f"rank {r} {part}")
        torch.testing.assert_close(graphed["center"], plain["center"])
    assert ranks[0]["plain"]["loss"] != ranks[1]["plain"]["loss"]  # the ranks saw different crops
    for p, q in zip(ranks[0]["graphed"]["student"], ranks[1]["graphed"]["student"]):
        assert torch.equal(p, q)  # and stayed in step
    assert torch.equal(ranks[0]["graphed"]["center"], ranks[1]["graphed"]["center"])  # the centre: a mean over both ranks' crops
    # a capture that failed on rank 0 only is a failure on both (one eager and one replaying rank would hang)
    assert [r["capture_failed_anywhere"] for r in ranks] == [[True, False], [True, False]]


def test_a_non_finite_graph_step_is_skipped_and_reported_like_the_deferred_step():
    from raydino.core.graphstep import GraphedStep
    from raydino.core.step import NonFiniteLossError, check_finite

    cfg = graph_cfg()
    state = build_train_state(cfg, steps_per_epoch=10)
    crops = random_crops(cfg, 4)
    step = GraphedStep(state, crops, capture=False)
    step(crops)
    before = [p.detach().clone() for p in state.student.parameters()] + [state.loss_fn.center.clone()]
    with torch.no_grad():
        state.student.head.mlp[0].weight.fill_(float("nan"))  # the next loss is NaN
        before[0] = state.student.backbone.cls_token.detach().clone()
    step(crops)
    assert torch.equal(state.student.backbone.cls_token, before[0]) and torch.equal(state.loss_fn.center, before[-1])
    with pytest.raises(NonFiniteLossError) as e:
        check_finite(state)
    assert e.value.step == 1


def test_a_graph_step_names_what_stands_in_its_way():
    from raydino.core.graphstep import GraphedStep, GraphedStepError

    cases = {
        ("optim.fused=false",): "optim.fused=true",
        ("train.compile=true",): "train.compile=true",
        ("model.arch=resnet18",): "model.arch='resnet18' has BatchNorm",
        ("model.head_use_bn=true",): "model.head_use_bn=true",
        ("optim.freeze_last_layer_epochs=1",): "last-layer freeze",
    }
    for extra, expected in cases.items():
        cfg = graph_cfg(*extra)
        state = build_train_state(cfg, steps_per_epoch=10)
        with pytest.raises(GraphedStepError, match=expected):
            GraphedStep(state, random_crops(cfg, 2), capture=False)
    state = build_train_state(graph_cfg(), steps_per_epoch=10)
    step = GraphedStep(state, random_crops(graph_cfg(), 2), capture=False)
    with pytest.raises(GraphedStepError, match="differ from the captured"):
        step(random_crops(graph_cfg(), 3))


def test_fit_with_cuda_graph_trains_the_freeze_eagerly_then_the_graphs_step_as_plain_fit_does(monkeypatch):
    # On the CPU the graph step runs its body uncaptured: what fit hands it, when, and what comes out.
    import raydino.core.graphstep as graphstep
    from raydino.core.loop import LoopHooks, fit

    made = []
    monkeypatch.setattr(graphstep.GraphedStep, "__init__", _recording(graphstep.GraphedStep.__init__, made))
    runs = {}
    for flag in ("false", "true"):
        cfg = graph_cfg("optim.freeze_last_layer_epochs=1", "train.epochs=2", "train.log_every=2", f"train.cuda_graph={flag}")
        state = build_train_state(cfg, steps_per_epoch=3)
        logged = []
        hooks = LoopHooks(on_log=lambda s, m: logged.append(m))

        def batches(epoch):
            for i in range(3):
                torch.manual_seed(1000 * epoch + i)  # the same stochastic depth in both runs
                yield random_crops(cfg, 2, seed=epoch * 3 + i)

        fit(state, batches, hooks)
        runs[flag] = (state, logged)
    assert made == [3]  # built once, at the first step after the one-epoch freeze
    (plain, plain_logs), (graphed, graph_logs) = runs["false"], runs["true"]
    assert [m["step"] for m in graph_logs] == [m["step"] for m in plain_logs] == [2, 3, 4, 6]
    for a, b in zip(plain_logs, graph_logs):
        assert set(a) == set(b) and b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for p, q in zip(plain.student.parameters(), graphed.student.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5)


def test_fit_trains_on_eagerly_after_a_failed_capture(monkeypatch):
    # A capture can fail on a GPU (an op a graph cannot hold): fit warns and trains every step
    # eagerly, the step whose capture failed included, as plain fit does.
    import raydino.core.graphstep as graphstep
    from raydino.core.loop import fit

    def failing_run(self):
        self.release()
        raise graphstep.GraphCaptureError("capturing the training step as a CUDA graph failed: RuntimeError: (test)")

    runs = {}
    for flag in ("false", "true"):
        if flag == "true":
            monkeypatch.setattr(graphstep.GraphedStep, "_run", failing_run)
        cfg = graph_cfg("optim.freeze_last_layer_epochs=1", "train.epochs=2", "train.log_every=1", f"train.cuda_graph={flag}")
        state = build_train_state(cfg, steps_per_epoch=3)

        def batches(epoch):
            for i in range(3):
                torch.manual_seed(1000 * epoch + i)
                yield random_crops(cfg, 2, seed=epoch * 3 + i)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[flag] = (state, fit(state, batches))
        runs[flag] += ([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],)
    (plain, plain_out, _), (graphed, out, warned) = runs["false"], runs["true"]
    assert len(warned) == 1 and "goes on with eager steps" in warned[0] and "(test)" in warned[0]
    assert graphed.step == plain.step == 6
    assert [h["loss"] for h in out.history] == pytest.approx([h["loss"] for h in plain_out.history], rel=1e-5)
    assert all(isinstance(g["lr"], float) for g in graphed.optimizer.param_groups)  # handed back to train_step


def _recording(init, made):
    def record(self, state, crops, *args, **kwargs):
        made.append(state.step)
        init(self, state, crops, *args, **kwargs)

    return record


def test_cuda_graph_config_refuses_what_cannot_be_captured_before_any_work():
    from raydino.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.cuda_graph=true cannot be combined with train.compile=true.*optim.fused=false"):
        load_config("vits16-paper", ["train.cuda_graph=true", "train.compile=true", "optim.fused=false"])
    with pytest.raises(ConfigError, match="model.head_use_bn=true"):
        load_config("smoke", ["train.cuda_graph=true"])  # smoke's head has BatchNorm
    assert load_config("vits16-paper", ["train.cuda_graph=true"]).train.cuda_graph


def test_a_graph_steps_checkpoint_resumes_as_a_plain_step(tmp_path):
    from raydino.core.graphstep import GraphedStep

    cfg = graph_cfg()
    crops = random_crops(cfg, 2)
    state = build_train_state(cfg, steps_per_epoch=10)
    step = GraphedStep(state, crops, capture=False)
    step(crops)
    state.optimizer.param_groups[0]["capturable"] = True  # as on CUDA
    save_checkpoint(state, tmp_path / "ckpt")
    saved = load_checkpoint(tmp_path / "ckpt")["optimizer"]["param_groups"]
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in saved)
    assert isinstance(state.optimizer.param_groups[0]["lr"], torch.Tensor)  # the live step keeps its device lr
    resumed = build_train_state(cfg, steps_per_epoch=10)
    restore_state(resumed, load_checkpoint(tmp_path / "ckpt"))
    assert resumed.step == 1 and math.isfinite(train_step(resumed, crops)["loss"])
