"""B5: time per denoising step of multi-LoRA diffusion forms (DESIGN §8): goal batched Composite ≤ 0.6·N × Switch.

One denoising step = the UNet call(s) on the classifier-free-guidance batch (latents ×2) + guidance + one
DPM-Solver++ scheduler step, with N random LoRA experts (rank ``--rank`` on to_q/to_k/to_v/to_out.0) stacked in
`bench.lora.stacked.StackedLoraLinear` layers (`bench.models.diffusion.stack_experts`), exactly as the methods run them:
  merge      one call, batch 2, all experts mixed with weights 1/N (linear arithmetic kept as LoRA)
  switch     one call, batch 2, one expert (LoRA Switch)
  serial     N calls, batch 2, one expert each (LoRA Composite, serial form)
  batched    one call, batch 2N, one expert per row (LoRA Composite, batched form)
The UNet is Stable Diffusion 1.5's, built from its config (random weights), fp16 on the GPU, 64×64 latents
(512 px); ``--quick`` uses the tiny smoke UNet in float32 on the CPU. Each timed call runs a whole ``--steps``-step
sampling loop (so the multistep scheduler state is real); the reported time is per step.

Needs torch and diffusers (plus diffusers' own dependencies); no transformers, peft or hydra.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.perf.common import pick_device, time_fn, write_results

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FORMS = ("merge", "switch", "serial", "batched")


def random_pool(root: torch.nn.Module, n: int, rank: int, seed: int = 0):
    """N random experts (names ``unet.<path>``) for every targeted linear layer under `root`."""
    from bench.lora.adapters import LoraAdapter, LoraModule
    from bench.lora.pool import ExpertPool

    g = torch.Generator().manual_seed(seed)
    adapters = []
    for i in range(n):
        modules = {}
        for path, layer in root.named_modules():
            if isinstance(layer, torch.nn.Linear) and path.endswith(TARGETS):
                A = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
                modules[path] = LoraModule(A, torch.randn(layer.out_features, rank, generator=g) * 0.01, 1.0)
        adapters.append(LoraAdapter(f"e{i}", "perf-unet", modules, task_type=None))
    return ExpertPool("perf-unet", adapters)


def interleaved(fns: dict, device: torch.device, warmup: int, repeat: int) -> dict[str, dict]:
    """`time_fn` of each function, the repeats taken round-robin so that load changes hit every form alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name] += time_fn(fn, device, warmup=0, repeat=1)["times_s"]
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts} for name, ts in times.items()}


def main(argv: list[str]) -> None:
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    from bench.models.diffusion import composite_noise, stack_experts

    parser = argparse.ArgumentParser(prog="python -m bench.perf composite", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, float32, CPU-sized")
    parser.add_argument("--device", default=None)
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per timed call")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    quick = args.quick or device.type == "cpu"
    dtype = torch.float32 if quick or device.type == "cpu" else torch.float16
    steps = args.steps or (2 if quick else 10)
    repeat, warmup = args.repeat or (5 if quick else 7), args.warmup if args.warmup is not None else (1 if quick else 2)
    config = TINY_UNET if quick else SD15_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    root = torch.nn.ModuleDict({"unet": unet})
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            algorithm_type="dpmsolver++")
    side = config["sample_size"]
    noise = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    cond = torch.randn(2, 77, config["cross_attention_dim"], device=device, dtype=dtype)  # [uncond; cond]
    guidance, scale = 7.5, 0.8

    def unet_fn(x, t, e):
        return unet(x, t, encoder_hidden_states=e, return_dict=False)[0]

    rows = []
    for n in args.ns:
        pool = random_pool(root, n, args.rank, seed=n)
        with stack_experts(root, pool) as mix, torch.inference_mode():
            embeds = [cond] * n

            def predict(form: str, x, t):
                if form == "merge":
                    mix.weighted(torch.full((n,), 1.0 / n, device=device))
                    return unet_fn(x, t, cond)
                if form == "switch":
                    mix.only(0, scale)
                    return unet_fn(x, t, cond)
                return composite_noise(unet_fn, mix, x, t, embeds, scale, batched=form == "batched")

            def loop(form: str):
                scheduler.set_timesteps(steps, device=device)
                latents = noise * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    uncond, text = predict(form, x, t).chunk(2)
                    latents = scheduler.step(uncond + guidance * (text - uncond), t, latents, return_dict=False)[0]
                return latents

            timed = interleaved({form: (lambda f=form: loop(f)) for form in FORMS}, device, warmup, repeat)
        switch = timed["switch"]["median_s"] / steps
        for form in FORMS:
            per_step = timed[form]["median_s"] / steps
            goal = ("yes" if per_step <= 0.6 * n * switch else "NO") if form == "batched" else ""
            rows.append({"n": n, "form": form, "ms_per_step": 1e3 * per_step,
                         "min_ms_per_step": 1e3 * timed[form]["min_s"] / steps, "x_switch": per_step / switch,
                         "goal_x_switch": 0.6 * n if form == "batched" else "", "goal_met": goal})
    meta = {"unet": "tiny (smoke)" if quick else "SD 1.5 config, random weights", "dtype": str(dtype),
            "latents": f"{side}x{side}", "cfg_batch": 2, "rank": args.rank, "targets": list(TARGETS),
            "steps_per_call": steps, "repeat": repeat, "warmup": warmup, "scheduler": "DPM-Solver++",
            "goal": "batched composite <= 0.6*N x switch (per denoising step)"}
    write_results("composite", rows, meta, device)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
