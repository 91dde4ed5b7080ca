"""The DINO core on a real CUDA GPU: bf16 autocast, NCCL + DDP, the device augmentation, no host
syncs in a deferred step, torch.compile; and, on any machine, what `bench gpu` measures with: the
official DINO recipe's step (`raydino/bench/reference_dino.py`) and the bench's rows.

The CUDA tests are skipped where no GPU is visible (CI, the 2-core dev machines); run them on a GPU
node with `python -m pytest tests/test_gpu.py`.  Imports no Ray.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from raydino.augment.cpu import MultiCropAugment
from raydino.augment.device import DeviceMultiCropAugment
from raydino.config import AugmentConfig, load_config
from raydino.core.step import autocast_dtype, build_train_state, train_step
from raydino.distributed.cluster import free_port

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cfg_for(*extra: str):
    return load_config(
        "smoke",
        [
            "model.out_dim=256",
            "model.head_hidden_dim=64",
            "model.head_bottleneck_dim=32",
            "model.drop_path_rate=0.0",
            "augment.n_local_crops=2",
            "train.batch_size=8",
            *extra,
        ],
    )


def crops_for(cfg, seed: int = 0, device: str = "cuda") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = cfg.augment
    sizes = [a.global_crop_size] * 2 + [a.local_crop_size] * a.n_local_crops
    return [torch.randint(0, 256, (cfg.train.batch_size, 3, s, s), generator=g, dtype=torch.uint8).to(device) for s in sizes]


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL process group: the backend Ray Train's TorchConfig picks on GPU workers."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@needs_cuda
def test_bf16_autocast_trains_and_keeps_fp32_weights():
    cfg = cfg_for()  # precision auto
    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=20, device="cuda")
    assert autocast_dtype(cfg, state.device) == torch.bfloat16
    assert autocast_dtype(cfg_for("train.precision=fp32"), state.device) is None
    crops = crops_for(cfg)
    losses = [train_step(state, crops)["loss"] for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1  # it learns (the same batch 20 times)
    # Master weights stay fp32 under autocast, student and teacher alike.
    for module in (state.student, state.teacher):
        assert {p.dtype for p in module.parameters()} == {torch.float32}


@needs_cuda
def test_bf16_loss_close_to_fp32_loss_on_the_same_weights():
    losses = {}
    for precision in ("bf16", "fp32"):
        cfg = cfg_for(f"train.precision={precision}")
        torch.manual_seed(0)
        state = build_train_state(cfg, steps_per_epoch=5, device="cuda")
        losses[precision] = train_step(state, crops_for(cfg))["loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


@needs_cuda
def test_cuda_fp32_steps_match_cpu_steps(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch-embedding conv in full fp32
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # and every matmul
    try:
        cfg = cfg_for("train.precision=fp32")
        losses = {}
        for device in ("cpu", "cuda"):
            torch.manual_seed(0)
            state = build_train_state(cfg, steps_per_epoch=5, device=device)
            crops = crops_for(cfg, device=device)
            losses[device] = [train_step(state, crops)["loss"] for _ in range(3)]
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
    assert losses["cpu"][2] != losses["cpu"][0]  # the steps changed the weights


@needs_cuda
def test_ddp_over_nccl_matches_a_plain_step(nccl_group):
    """One rank: DDP's NCCL all-reduce of gradients (and the loss's centre all-reduce) changes nothing."""
    cfg = cfg_for("train.precision=fp32")
    torch.manual_seed(0)
    plain = build_train_state(cfg, steps_per_epoch=5, device="cuda")
    wrapped = copy.deepcopy(plain)
    wrapped.student = DistributedDataParallel(wrapped.student, device_ids=[0])
    crops = crops_for(cfg)
    for _ in range(2):
        a, b = train_step(plain, crops), train_step(wrapped, crops)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for p, q in zip(plain.student.parameters(), wrapped.student_module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_resnet_trains_in_bf16_under_ddp_over_nccl(nccl_group):
    """BatchNorm under autocast and DDP (SyncBatchNorm itself needs 2+ GPUs: NCCL refuses two ranks on one)."""
    cfg = cfg_for("model.arch=resnet18")
    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=10, device="cuda")
    state.student = DistributedDataParallel(state.student, device_ids=[0])
    crops = crops_for(cfg)
    losses = [train_step(state, crops)["loss"] for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@needs_cuda
def test_device_augmentation_on_cuda_matches_cpu_with_the_same_draws():
    from raydino.bench.common import fundus_jpeg

    jpeg, _ = fundus_jpeg(256)
    results = {}
    for noise_p in (0.0, 1.0):
        cfg = AugmentConfig(preset="weak_med", global_crop_size=64, local_crop_size=32, n_local_crops=3, noise_p=noise_p)
        cpu = MultiCropAugment(cfg, backend="torch")
        gpu = DeviceMultiCropAugment(cfg, device="cuda")
        params = cpu.sample_params([(256, 256)] * 8, generator=3)
        a = cpu.augment_tensors([jpeg] * 8, params=params)
        b = gpu.augment_tensors([jpeg] * 8, params=params)
        assert set(a) == set(b)
        for k in a:
            assert b[k].is_cuda and b[k].dtype == torch.uint8 and b[k].shape == a[k].shape
        results[noise_p] = {k: (a[k].int() - b[k].cpu().int()).float() for k in a}
    for k, diff in results[0.0].items():
        # Same draws, no noise: CUDA resizes in float, the CPU in uint8, so a level here and there.
        assert diff.abs().mean() < 0.5 and diff.abs().max() <= 8, (k, diff.abs().mean(), diff.abs().max())
    for k, diff in results[1.0].items():
        # Additive noise (std 0.1 x 255) comes from each device's own generator: independent draws,
        # so the difference is noise of std ~sqrt(2) x 25.5 (less where clipped at 0 or 255).
        assert 15 < diff.std() < 45, (k, diff.std())


# ---------------------------------------------------------------- issue 14 on CUDA


@needs_cuda
def test_a_deferred_step_never_waits_for_the_gpu():
    """After a first step (allocations, optimizer state), a deferred step issues no synchronising call."""
    from raydino.core.step import check_finite

    cfg = cfg_for()
    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=10, device="cuda")
    assert all(g["fused"] for g in state.optimizer.param_groups)  # fused AdamW by default on CUDA
    crops = crops_for(cfg)
    train_step(state, crops, defer=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            train_step(state, crops, defer=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_finite(state)


@needs_cuda
def test_the_whole_step_replayed_as_a_cuda_graph_trains_as_its_eager_body_without_launching_it():
    from raydino.core.flops import KernelOpCounter
    from raydino.core.graphstep import GraphedStep
    from raydino.core.step import check_finite

    cfg = cfg_for("optim.freeze_last_layer_epochs=0", "model.head_use_bn=false")
    batches = [crops_for(cfg, seed=i) for i in range(4)]
    captured, eager = (build_train_state(cfg, steps_per_epoch=10, device="cuda") for _ in range(2))
    graphed = GraphedStep(captured, batches[0], capture=True, warmup=2)
    body = GraphedStep(eager, batches[0], capture=False)
    for b in batches[:3]:  # two eager warm-up steps on a side stream, then the capture and its first replay
        graphed(b), body(b)
    assert graphed.captured and captured.step == eager.step == 3
    torch.cuda.synchronize()
    for b in batches[1:]:  # replays
        with KernelOpCounter() as ops:
            torch.cuda.set_sync_debug_mode("error")
            try:
                g = graphed(b)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        e = body(b)
        assert ops.total < 40, ops.by_name  # copies in, scalars, the outputs' clones: the step itself is one replay
        assert g["loss"].item() == pytest.approx(e["loss"].item(), rel=1e-3)
    for p, q in zip(captured.student.parameters(), eager.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)
    check_finite(captured)


@needs_cuda
def test_a_failed_capture_hands_the_state_back_to_eager_steps(monkeypatch):
    # A host read inside the capture (an op a graph cannot hold) must fail as GraphCaptureError, having
    # run nothing of that step, and leave a state that trains on with train_step.
    from raydino.core.graphstep import GraphCaptureError, GraphedStep
    from raydino.core.step import check_finite

    cfg = cfg_for("optim.freeze_last_layer_epochs=0", "model.head_use_bn=false")
    state = build_train_state(cfg, steps_per_epoch=10, device="cuda")
    crops = crops_for(cfg)
    graphed = GraphedStep(state, crops, capture=True, warmup=1)
    graphed(crops)  # the eager warm-up call
    body = GraphedStep.body

    def body_with_a_sync(self):
        out = body(self)
        float(out["loss"])  # waits for the GPU: not allowed while capturing
        return out

    monkeypatch.setattr(GraphedStep, "body", body_with_a_sync)
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in state.student.parameters()]
    with pytest.raises(GraphCaptureError, match="CUDA graph failed"):
        graphed(crops)
    assert not graphed.captured and state.step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, state.student.parameters()))  # nothing of it ran
    assert all(p.grad is None for p in state.student.parameters()) and isinstance(state.optimizer.param_groups[0]["lr"], float)
    for i in range(2):
        train_step(state, crops_for(cfg, seed=i + 1), defer=True)
    check_finite(state)
    assert state.step == 3 and not all(torch.equal(a, b) for a, b in zip(before, state.student.parameters()))


@needs_cuda
def test_an_nccl_all_reduce_replays_inside_a_cuda_graph(nccl_group):
    # What a graph step does on more than one GPU (its gradient all-reduce), checked on the one-rank
    # group a single GPU has: NCCL called inside a capture, then replayed on new values.
    x = torch.zeros(1024, device="cuda")
    dist.all_reduce(x)  # the communicator is set up before the capture, as a graph step's warm-up does
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        dist.all_reduce(x)
        y = x * 2
    torch.cuda.current_stream().wait_stream(side)
    for value in (1.0, 3.0):
        x.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, torch.full_like(x, 2 * value))


@needs_cuda
def test_a_non_finite_deferred_step_is_skipped_on_the_gpu():
    from raydino.core.step import NonFiniteLossError, check_finite

    cfg = cfg_for()
    state = build_train_state(cfg, steps_per_epoch=10, device="cuda")
    train_step(state, crops_for(cfg), defer=True)
    before = [p.detach().clone() for p in (*state.student.parameters(), *state.teacher.parameters())]
    bad = [c.float() for c in crops_for(cfg, seed=1)]
    bad[0][0, 0, 0, 0] = float("nan")
    train_step(state, bad, defer=True)
    train_step(state, crops_for(cfg, seed=2), defer=True)
    after = list((*state.student.parameters(), *state.teacher.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(NonFiniteLossError, match="step 1"):
        check_finite(state)


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead: CUDA graphs, not yet run on a GPU
def test_compiled_bf16_steps_match_eager_steps_on_cuda(mode):
    cfg = cfg_for()
    losses = {}
    for compiled in ("false", "true"):
        conf = cfg_for(f"train.compile={compiled}", f"train.compile_mode={mode}")
        torch.manual_seed(0)
        state = build_train_state(conf, steps_per_epoch=10, device="cuda")
        # deferred, as loop.fit runs it: the step a CUDA graph can replay has no host sync
        losses[compiled] = [float(train_step(state, crops_for(cfg, seed=i), defer=True)["loss"]) for i in range(3)]
    assert losses["true"] == pytest.approx(losses["false"], rel=0.02)


@needs_cuda
def test_reference_dino_step_runs_in_fp16_with_a_grad_scaler_on_cuda():
    from raydino.bench.reference_dino import ReferenceDINO
    from raydino.core.step import normalize_on_device

    cfg = cfg_for("loss.koleo_weight=0")
    ref = ReferenceDINO(cfg, "cuda", precision="fp16")
    images = [normalize_on_device(c) for c in crops_for(cfg)]
    losses = [ref.step(images, lr=1e-3, wd=0.04, momentum=0.99) for _ in range(5)]
    assert ref.scaler is not None and all(torch.isfinite(torch.tensor(losses)))


# ---------------------------------------------------------------- the official recipe's step, on any machine


def reference_cfg(*extra: str):
    return cfg_for(
        "loss.koleo_weight=0",
        "model.head_use_bn=false",
        "optim.lr=0.05",
        "optim.warmup_epochs=0",
        "optim.freeze_last_layer_epochs=0",
        "train.batch_size=4",
        *extra,
    )


def test_reference_dino_steps_match_raydinos_steps_on_the_same_weights():
    """Three steps of the recipe's code and of raydino's from the same weights and crops (fp32 on the CPU):
    equal losses (each after the previous update), so the yardstick computes the same DINO."""
    from raydino.bench.reference_dino import ReferenceDINO, load_from_raydino
    from raydino.core.step import normalize_on_device

    cfg = reference_cfg("augment.local_crop_size=32")  # one resolution: the two resample position embeddings differently
    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=10)
    ref = ReferenceDINO(cfg, "cpu", precision="fp32", teacher_temps=state.schedules.teacher_temp)
    load_from_raydino(ref, state.student, state.teacher)
    crops = crops_for(cfg, device="cpu")
    for i in range(3):
        lr, wd, m = state.schedules.at(i)
        ref_loss = ref.step([normalize_on_device(c) for c in crops], lr, wd, m)
        # the same weights first; then Adam's first steps amplify float noise in gradients that are ~0
        # (biases with no effect on the output), so later losses agree to ~1e-4 depending on threads
        assert train_step(state, crops)["loss"] == pytest.approx(ref_loss, rel=1e-5 if i == 0 else 1e-3)
    torch.testing.assert_close(ref.loss.center, state.loss_fn.center, rtol=1e-3, atol=1e-5)


def test_reference_vit_gives_timms_features_on_global_crops_and_resamples_for_local_ones():
    from raydino.bench.reference_dino import ReferenceDINO, load_from_raydino
    from raydino.core.step import normalize_on_device

    cfg = reference_cfg()
    torch.manual_seed(0)
    state = build_train_state(cfg, steps_per_epoch=10)
    ref = ReferenceDINO(cfg, "cpu", precision="fp32")
    load_from_raydino(ref, state.student, state.teacher)
    crops = [normalize_on_device(c) for c in crops_for(cfg, device="cpu")]
    with torch.no_grad():
        torch.testing.assert_close(ref.teacher.backbone(crops[0]), state.teacher.backbone(crops[0]), rtol=1e-4, atol=1e-5)
        local = ref.teacher.backbone(crops[2])
    assert local.shape == (cfg.train.batch_size, 192) and torch.isfinite(local).all()


def test_reference_dino_loss_equals_raydinos_on_the_same_logits():
    import numpy as np

    from raydino.bench.reference_dino import DINOLoss as RefLoss
    from raydino.core.loss import DINOLoss

    torch.manual_seed(0)
    K, B, n_crops, temps = 32, 3, 4, np.array([0.04, 0.05])
    ours, ref = DINOLoss(K, n_crops, temps), RefLoss(K, n_crops, temps)
    for _ in range(3):  # the centre moves between calls
        s, t = torch.randn(n_crops * B, K), torch.randn(2 * B, K)
        assert ours(s, t, epoch=1).item() == pytest.approx(ref(s, t, epoch=1).item(), rel=1e-6)
        torch.testing.assert_close(ours.center, ref.center)


# ---------------------------------------------------------------- bench gpu's rows, dry run on the CPU


def test_bench_gpu_rows_add_one_change_each():
    from raydino.bench.gpu import row_overrides

    plan = row_overrides(["baseline", "fused_adamw", "deferred_check", "fewer_launches", "compile", "batch_x2", "fp32", "fp32_head_logits"])
    assert plan["baseline"] == (
        {"optim.fused": False, "train.compile": False, "train.fp32_head_logits": False, "train.fewer_launches": False},
        False,
        1,
    )
    assert plan["fused_adamw"][0]["optim.fused"] is True and plan["fused_adamw"][1] is False
    assert plan["deferred_check"][1] is True and plan["deferred_check"][0]["train.fewer_launches"] is False
    assert plan["fewer_launches"] == ({**plan["deferred_check"][0], "train.fewer_launches": True}, True, 1)
    assert plan["compile"][0]["train.compile"] is True
    assert plan["batch_x2"] == ({**plan["compile"][0]}, True, 2)
    assert plan["fp32"][0]["train.precision"] == "fp32" and plan["fp32"][0]["train.compile"] is False
    assert plan["fp32_head_logits"][0]["train.fp32_head_logits"] is True
    graphs = row_overrides(["compile_cudagraphs"])["compile_cudagraphs"]  # beside the eager deferred step
    assert graphs == ({"optim.fused": True, "train.compile": True, "train.fp32_head_logits": False, "train.compile_mode": "reduce-overhead"}, True, 1)
    # a row builds only on the rows chosen above it
    assert row_overrides(["baseline", "batch_x2"])["batch_x2"] == (plan["baseline"][0], True, 2)


@pytest.mark.slow  # ~30 s on 2 cores: six rows built and stepped
def test_bench_gpu_dry_run_on_cpu_fills_every_row_with_flops_and_ratios(tmp_path):
    import json
    import math

    from raydino.bench import __main__ as bench

    rows = ["baseline", "fused_adamw", "deferred_check", "fewer_launches", "batch_x2", "cuda_graph", "fp32", "reference"]
    args = ["gpu", "--device", "cpu", "--config", "smoke", "--steps", "1", "--warmup", "1", "--rows", *rows, "--peak-tflops", "1"]
    for kv in (
        "model.out_dim=256",
        "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32",
        "augment.n_local_crops=2",
        "train.batch_size=2",
        "optim.fused=true",
        "model.drop_path_rate=0.1",  # the paper's: the student's stochastic depth, what fewer_launches batches
        "model.head_use_bn=false",  # the paper's head; a BatchNorm head cannot run as one CUDA graph
    ):
        args += ["--set", kv]
    assert bench.main([*args, "--json", str(tmp_path / "gpu.json")]) == 0
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert list(r["rows"]) == rows and (tmp_path / "gpu.png").exists()
    assert r["flops"]["per_image"] > 0 and r["fused_attention"] is True and r["peak_tflops"] == 1
    # raydino.plan reads training.bf16: the row that trains the config as given (fused, deferred, eager)
    assert r["training"]["bf16"]["row"] == "fewer_launches" and r["training"]["fp32"]["row"] == "fp32"
    for name, t in r["rows"].items():
        assert t["all_finite"] and math.isfinite(t["images_per_s"]), name
        assert t["tflops"] == pytest.approx(r["flops"]["per_image"] * t["images_per_s"] / 1e12) and t["mfu"] == pytest.approx(t["tflops"])
    assert r["rows"]["batch_x2"]["batch_size"] == 4 and r["rows"]["reference"]["precision"] == "fp32"  # fp16 only on CUDA
    assert {"best_over_baseline", "best_over_reference", "batch_x2_over_reference"} <= set(r["ratios"])
    # kernel ops per step, counted for every eager row and the recipe: fewer with fewer_launches
    # (on the CPU nothing autocasts here, so only the batched stochastic depth counts)
    ops = {name: t["kernel_ops_per_step"] for name, t in r["rows"].items()}
    assert all(isinstance(n, int) and n > 0 for n in ops.values()), ops
    assert ops["fewer_launches"] < ops["deferred_check"] and r["ratios"]["fewest_kernel_ops"] in ("fewer_launches", "batch_x2")
    assert r["ratios"]["reference_over_fewest_kernel_ops"] > 1
    assert r["rows"]["cuda_graph"]["cuda_graph"] and not r["rows"]["cuda_graph"]["captured"]  # no capture on the CPU: its body, eagerly
    assert r["numerics"]["rel_diff_bf16"] < 0.02 and "augmentation" not in r


def test_bench_gpu_reports_a_row_that_cannot_be_a_cuda_graph_and_runs_the_others(tmp_path):
    import json

    from raydino.bench import __main__ as bench

    args = ["gpu", "--device", "cpu", "--config", "smoke", "--steps", "1", "--warmup", "1", "--rows", "deferred_check", "cuda_graph"]
    args += ["--set", "model.out_dim=64", "--set", "augment.n_local_crops=2", "--set", "train.batch_size=2"]  # smoke's BatchNorm head
    assert bench.main([*args, "--json", str(tmp_path / "gpu.json")]) == 0
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert rows["deferred_check"]["all_finite"] and not rows["cuda_graph"]["all_finite"]
    assert "model.head_use_bn=true" in rows["cuda_graph"]["error"]


def test_bench_gpu_reports_where_a_row_failed_and_runs_the_others(tmp_path, monkeypatch, capsys):
    """A step that raises (as a failed CUDA-graph capture would, at the op that broke it) or a row that
    raises before its steps: each is reported with its error and frames; the rows after it still run."""
    import json

    import raydino.core.graphstep as graphstep
    from raydino.bench import __main__ as bench

    def broken_body(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphstep.GraphedStep, "body", broken_body)
    args = ["gpu", "--device", "cpu", "--config", "smoke", "--steps", "1", "--warmup", "1", "--rows", "deferred_check", "cuda_graph", "fp32"]
    for kv in ("model.out_dim=64", "augment.n_local_crops=2", "train.batch_size=2", "model.head_use_bn=false"):
        args += ["--set", kv]
    assert bench.main([*args, "--json", str(tmp_path / "gpu.json")]) == 0
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert rows["deferred_check"]["all_finite"] and rows["fp32"]["all_finite"]
    assert rows["cuda_graph"]["error"] == "RuntimeError: operation not permitted when stream is capturing"
    assert rows["cuda_graph"]["error_where"][-1].endswith("broken_body")
    assert "at tests/test_gpu.py" in capsys.readouterr().out  # the frames are printed with the row

    def broken_init(self, *a, **k):
        raise TypeError("a torch that cannot build the graph step")

    monkeypatch.setattr(graphstep.GraphedStep, "__init__", broken_init)
    assert bench.main([*args, "--json", str(tmp_path / "gpu2.json")]) == 0
    rows = json.loads((tmp_path / "gpu2.json").read_text())["rows"]
    assert rows["fp32"]["all_finite"] and rows["cuda_graph"]["error"].startswith("TypeError: a torch that cannot")


def test_bench_gpu_runs_a_row_at_twice_the_batch_on_its_own(tmp_path):
    """`tools/gpu_check.sh` times `--rows batch_x2` alone: the numerics still need the config's batch."""
    import json

    from raydino.bench import __main__ as bench

    args = ["gpu", "--device", "cpu", "--config", "smoke", "--steps", "1", "--warmup", "1", "--rows", "batch_x2"]
    for kv in ("model.out_dim=256", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "augment.n_local_crops=2", "train.batch_size=2"):
        args += ["--set", kv]
    assert bench.main([*args, "--json", str(tmp_path / "gpu.json")]) == 0
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert list(r["rows"]) == ["batch_x2"] and r["rows"]["batch_x2"]["batch_size"] == 4 and r["rows"]["batch_x2"]["all_finite"]
    assert r["numerics"]["rel_diff_bf16"] < 0.02


@pytest.mark.slow  # ~15 s: a subprocess builds and steps the smoke model
def test_gpu_profile_tool_reports_host_and_wall_time_per_step():
    """`tools/gpu_profile.py` on the CPU: there every op runs as it is called, so the host time is the wall time."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "tools/gpu_profile.py", "--device", "cpu", "--config", "smoke", "--batch", "2", "--steps", "3"]
    out = subprocess.run([*cmd, "--set", "model.out_dim=256"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"host ([\d.]+) ms per step, wall ([\d.]+) ms \((\d+) images/s\); host/wall ([\d.]+)", out.stdout)
    assert m, out.stdout[-2000:]
    host, wall, ratio = float(m.group(1)), float(m.group(2)), float(m.group(4))
    assert 0 < host <= wall * 1.01 and ratio > 0.9
    assert re.search(r"per step: \d+ kernel launches", out.stdout) and "aten::" in out.stdout  # the profiler's table
    graph = subprocess.run([*cmd, "--cuda-graph", "--set", "model.head_use_bn=false"], cwd=root, capture_output=True, text=True, timeout=300)
    assert graph.returncode == 0 and re.search(r"host [\d.]+ ms per step", graph.stdout), graph.stderr[-2000:]  # its body, uncaptured here
    if not torch.cuda.is_available():  # the default device: a clear refusal, not a torch error
        refused = subprocess.run([sys.executable, "tools/gpu_profile.py"], cwd=root, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "no CUDA device is visible here" in refused.stderr
