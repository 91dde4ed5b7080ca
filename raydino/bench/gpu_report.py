"""`bench gpu`'s console table and PNG, from the result dict `raydino.bench.gpu.bench_gpu` returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What each row of `raydino.bench.gpu.ROWS` changes, as the table prints it.
ROW_LABELS = {
    "baseline": "baseline (foreach AdamW, eager, host sync every step)",
    "fused_adamw": "+ fused AdamW",
    "deferred_check": "+ deferred finite check / metrics (no per-step sync)",
    "fewer_launches": "+ fewer launches (batched drop-path masks, bf16 teacher weights)",
    "compile": "+ torch.compile (student and teacher)",
    "batch_x2": "+ twice the batch per GPU (lr scaled linearly)",
    "fp32_head_logits": "deferred_check with fp32 logits in the head's last layer",
    "compile_cudagraphs": "compiled as CUDA graphs (reduce-overhead)",
    "cuda_graph": "the whole step as one CUDA graph (core/graphstep.py)",
    "fp32": "fp32 (no autocast; fused, deferred, eager)",
    "reference": "official DINO recipe (fp16 autocast + GradScaler)",
}


def row_line(row: str, r: dict[str, Any]) -> str:
    extra = f", compile {r['compile_s']:.0f} s" if r.get("compiled") else ""
    mem = f", peak {r['peak_gpu_mem_gb']:.1f} GB" if r.get("peak_gpu_mem_gb") is not None else ""
    return f"{row}: median step {1000 * r['median_step_s']:.1f} ms, {r['images_per_s']:.0f} images/s{mem}{extra}, finite={r['all_finite']}"


def print_gpu(r: dict[str, Any]) -> None:
    peak = f"{r['peak_tflops']:.0f}" if r.get("peak_tflops") else "unknown"
    print(
        f"\nraydino bench gpu on {r['device']} ({r['machine']}" + (f", NCCL {r['nccl']}" if r.get("nccl") else "") + f"): {r['model']}, "
        f"batch {r['batch_size']}, {r['crops']} crops" + (", DDP over NCCL" if r.get("nccl") else "")
    )
    f = r["flops"]
    print(
        f"  {f['per_image'] / 1e9:.1f} GFLOP per image per step (torch FlopCounterMode: teacher fwd {f['teacher_forward'] / 1e9:.0f}, "
        f"student fwd {f['student_forward'] / 1e9:.0f}, bwd {f['student_backward'] / 1e9:.0f} GFLOP per step); "
        f"peak {peak} TFLOP/s dense bf16; fused attention (SDPA) in timm's ViT: {r['fused_attention']}"
    )
    for name, t in r["rows"].items():
        mfu = f"{100 * t['mfu']:5.1f}%" if t.get("mfu") is not None else "   n/a"
        comp = f"  compile {t['compile_s']:.0f} s" if t.get("compiled") else ""
        comp += f"  warm-up and capture {t['compile_s']:.1f} s" if t.get("captured") else ""
        be = t.get("compile_break_even_steps")
        comp += f" (pays off after {be:.0f} steps)" if be else ""
        ops = f"{t['kernel_ops_per_step']:5d}" if t.get("kernel_ops_per_step") else "  n/a"
        print(
            f"  {ROW_LABELS.get(name, name):58s} b{t['batch_size']:<4d} {1000 * t['median_step_s']:7.1f} ms  {t['images_per_s']:6.0f} img/s  "
            f"{t['tflops']:6.1f} TFLOP/s  MFU {mfu}  kernel ops {ops}  finite {t['all_finite']}{comp}"
        )
        if t.get("error"):
            print(f"      {name} stopped: {t['error'][:300]}")
            for frame in t.get("error_where") or []:
                print(f"        at {frame}")
    n = r["numerics"]
    print(
        f"  numerics, same weights and crops: loss fp32 {n['fp32']:.4f}, bf16 {n['bf16']:.4f} ({100 * n['rel_diff_bf16']:.2f} %), "
        f"bf16 with fp32 logits {n['bf16_fp32_logits']:.4f} ({100 * n['rel_diff_bf16_fp32_logits']:.2f} %)"
    )
    ratios = r["ratios"]
    if "best_over_baseline" in ratios:
        print(f"  best at batch {r['batch_size']} ({ratios['best_at_config_batch']}) / baseline: {ratios['best_over_baseline']:.2f}x")
    if "best_over_reference" in ratios:
        print(f"  best at batch {r['batch_size']} / official DINO recipe: {ratios['best_over_reference']:.2f}x")
    if "reference_over_fewest_kernel_ops" in ratios:
        print(
            f"  kernel ops per step: official DINO recipe / {ratios['fewest_kernel_ops']}: {ratios['reference_over_fewest_kernel_ops']:.2f}x "
            "(each op is a launch from the host: what a host-bound step waits for)"
        )
    if "batch_x2_over_reference" in ratios:
        print(f"  twice the batch / official DINO recipe: {ratios['batch_x2_over_reference']:.2f}x")
    if "baseline_over_fp32" in ratios:
        print(f"  ratio bf16 (baseline) / fp32 images/s: {ratios['baseline_over_fp32']:.2f}")
    a = r.get("augmentation")
    if a:
        c = a["cores_to_feed_training"]
        print(
            f"  augmentation: GPU pipeline {a['gpu_images_per_s']:.0f} images/s; per CPU core: DINO reference "
            f"{a['reference_dino_images_per_s_per_core']:.0f}, raydino {a['raydino_cpu_images_per_s_per_core']:.0f} "
            f"({a['raydino_cpu_backend']})"
        )
        print(
            f"  cores to feed {a['training_rate_fed']['images_per_s']:.0f} images/s: DINO reference {c['reference_dino']:.1f}, "
            f"raydino CPU {c['raydino_cpu']:.1f}; augmenting on the GPU adds {100 * a['gpu_augment_share_of_step']:.0f}% to a step"
        )


def plot_gpu(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = r.get("augmentation")
    ops = {n: t["kernel_ops_per_step"] for n, t in r["rows"].items() if t.get("kernel_ops_per_step")}
    panels = 1 + bool(a) + bool(ops)
    fig, axes = plt.subplots(1, panels, figsize=(5 + 4 * panels, 4), squeeze=False)
    ax1 = axes[0][0]
    names = list(r["rows"])
    rates = [r["rows"][n]["images_per_s"] for n in names]
    colors = ["#999999" if n in ("reference", "fp32") else "#1f77b4" for n in names]
    ax1.barh([f"{n} (b{r['rows'][n]['batch_size']})" for n in names][::-1], rates[::-1], color=colors[::-1])
    for i, n in enumerate(names[::-1]):
        t = r["rows"][n]
        label = f" {t['tflops']:.0f} TFLOP/s" + (f", MFU {100 * t['mfu']:.0f}%" if t.get("mfu") is not None else "")
        ax1.text(t["images_per_s"], i, label, va="center", fontsize=8)
    ax1.set_xlabel("training images / s")
    dry = "\n(a CPU dry run: its timings are not a measurement)" if r["device"] == "cpu" else ""
    ax1.set_title(f"{r['model']}, {r['crops']}{dry}")
    if ops:  # what a host-bound step waits for: one launch (at least) per op
        ax3 = axes[0][-1]
        names_ops = list(ops)[::-1]
        ax3.barh(names_ops, [ops[n] for n in names_ops], color=["#999999" if n == "reference" else "#2ca02c" for n in names_ops])
        for i, n in enumerate(names_ops):
            ax3.text(ops[n], i, f" {ops[n]:,}", va="center", fontsize=8)
        ax3.set_xlabel("kernel ops per step (counted, any device)")
    if a:
        ax2 = axes[0][1]
        cores = r["cpu_count"] or 1
        labels = ["GPU pipeline", f"{cores}-core raydino CPU", f"{cores}-core DINO reference"]
        vals = [a["gpu_images_per_s"], cores * a["raydino_cpu_images_per_s_per_core"], cores * a["reference_dino_images_per_s_per_core"]]
        ax2.barh(labels[::-1], vals[::-1], color=["#d62728", "#1f77b4", "#1f77b4"])
        ax2.axvline(a["training_rate_fed"]["images_per_s"], color="k", ls="--", label="training rate")
        ax2.set_xlabel("augmented images / s")
        ax2.legend(loc="lower right")
    fig.suptitle(r["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
