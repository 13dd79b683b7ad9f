"""Run-time defaults of a transformer run: which preset and how many steps on this machine, the
device, the step-scaled lifecycle and evaluation schedule, and the guard against weeks of CPU work.

These are the substrate's policy, so every command that runs cells (`sandbox full`, `factorial`,
`sweep --system substrate`, `fusion`) asks here instead of deciding for itself.
"""

from __future__ import annotations

from sandbox.errors import BadInput

#: The study's preset and step count, run by default when CUDA is visible.
GPU_PRESET, GPU_STEPS = "widened-1536", 25_000
#: The default on a CPU: a preset that finishes in minutes.
CPU_PRESET = "small"
#: Default adaptation steps per preset (widened-1536: the study's 25,000).
PRESET_STEPS = {"tiny": 100, "small": 200, GPU_PRESET: GPU_STEPS}
CPU_STEPS = PRESET_STEPS[CPU_PRESET]
#: The router's default peak learning rate as a multiple of the adapters' (`CellConfig.router_lr`
#: unset). Measured on ``tiny`` (100 steps, seeds 0-3, B3 and R with ``tau_scales=input``; ratios 1,
#: 3, 10, 30): at 1 and 3 the softmax router never leaves its start (16 of 16 slots above 5%, top-4
#: share <= 0.27, MI(domain; slot) <= 0.0003 nats), at 30 the sigmoid router shuts its own gates
#: (input-dependent part 0.04 of 0.5 at the start) and does worst; 10 is the one ratio tried where
#: both routers move (B3: top-4 0.31, 14.75 slots; R: MI 0.21, own-slot share 0.31, gates open 0.23).
#: The mean held-out loss of the two routers does not pick a ratio (4.7657, 4.7633, 4.7659, 4.7648),
#: and the router contrast changes sign with it (-0.0007, +0.0036, -0.0051, -0.0234 nats): each router
#: has its own best ratio (R about 3, B3 30 or more), which one shared default cannot give both.
ROUTER_LR_RATIO = 10.0
#: The most a run may read each of its fixed training windows (epochs) before its manifest warns
#: (`substrate.cell.data_check`). On ``tiny`` with 128 windows per domain, 1,000 steps read each window
#: 16 times and B3's held-out loss rose while its training loss fell; with 2,048 windows per domain (about
#: one read each) the router contrast was a tie. A cell run defaults to fresh windows above one read.
MAX_EPOCHS = 4.0
#: Bases the seeds of `sandbox full` and `factorial` are spread over when --bases is not given (seed s
#: adapts base s mod N): at least 3 on the CPU presets, so replicates resample the base (4 bases of
#: ``tiny`` gave router contrasts with an SD of 0.0013 nats, six times the within-base standard error);
#: one on the GPU preset, whose base takes hours to pretrain.
PRESET_BASES = {"tiny": 3, "small": 3, GPU_PRESET: 1}
#: Throughput of widened-1536 measured on 2 CPU cores (README, "Speed on this machine"): tokens/s.
CPU_TOKENS_PER_S = {"adapt": 40.0, "pretrain": 16.0}


def resolve_device(device: str | None) -> str:
    """None or ``auto``: cuda when visible, else cpu; ``cuda`` without a GPU is refused."""
    import torch

    device = "auto" if device is None else device
    if device not in ("auto", "cpu", "cuda"):
        raise BadInput("--device", device, "auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device", device, "auto or cpu (no CUDA device is visible)")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def choose_run(preset: str | None, steps: int | None, device: str) -> tuple[str, int, str | None]:
    """``(preset, steps, note)``: with neither given, widened-1536 x 25,000 on CUDA and small x 200 on
    a CPU (``note`` says so); a preset alone gets its own steps (`PRESET_STEPS`; widened-1536 runs
    its 25,000 on CUDA); steps alone run on the device's preset."""
    note = None
    if preset is None and steps is None:
        if device == "cuda":
            preset, steps = GPU_PRESET, GPU_STEPS
        else:
            preset, steps = CPU_PRESET, CPU_STEPS
            note = f"no CUDA: running preset {CPU_PRESET} for {CPU_STEPS} steps instead of {GPU_PRESET} x {GPU_STEPS}"
    elif preset is None:
        preset = GPU_PRESET if device == "cuda" else CPU_PRESET
    elif steps is None:
        steps = GPU_STEPS if (preset == GPU_PRESET and device == "cuda") else PRESET_STEPS.get(preset, GPU_STEPS)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BadInput("--steps", steps, "an integer >= 1")
    return preset, steps, note


def schedule(steps: int, interval: int | None, min_age: int | None, eval_every: int | None,
             checkpoint_every: int | None, interval_flag: str = "--lifecycle-every") -> dict:
    """Step-scaled defaults: the lifecycle interval steps/5 clamped to [5, 250], min age 2 x interval
    (<= 500), eval steps/5 (<= 1000), checkpoints with every evaluation. A value given is kept (and
    must be >= 1, or >= 0 for ``min_age`` and ``checkpoint_every``; the 5 bounds only the default).
    ``interval_flag`` is the flag that gave ``interval`` (`--lifecycle-every`, or the old `--interval`)."""
    for flag, v, lo in ((interval_flag, interval, 1), ("--min-age", min_age, 0), ("--eval-every", eval_every, 1),
                        ("--checkpoint-every", checkpoint_every, 0)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise BadInput(flag, v, f"an integer >= {lo}")
    iv = interval if interval is not None else min(250, max(5, steps // 5))
    ev = eval_every if eval_every is not None else min(1000, max(1, steps // 5))
    return {"interval": iv, "min_age": min_age if min_age is not None else min(500, 2 * iv), "eval_every": ev,
            "checkpoint_every": checkpoint_every if checkpoint_every is not None else ev}


def cpu_hours(cfg) -> float:
    """Rough CPU hours of one run of `cfg` (a `substrate.cell.CellConfig`: adaptation plus, if not
    cached yet, pretraining), from the throughput measured for widened-1536 on 2 cores."""
    s = cfg.substrate()
    adapt = cfg.steps * cfg.batch * s["context"] / CPU_TOKENS_PER_S["adapt"]
    pre = s["pretrain_steps"] * s["pretrain_batch"] * s["context"] / CPU_TOKENS_PER_S["pretrain"]
    return (adapt + pre) / 3600


def check_affordable(cfg, yes: bool) -> None:
    """Refuse widened-1536 on a CPU unless `yes`: it would silently start weeks of work."""
    if cfg.device == "cpu" and cfg.preset == GPU_PRESET and not yes:
        s = cfg.substrate()
        raise BadInput("--preset", cfg.preset, f"tiny or small on a CPU ({GPU_PRESET} here means {cfg.steps} steps plus "
                       f"{s['pretrain_steps']} pretraining steps, roughly {cpu_hours(cfg):,.0f} CPU hours at the "
                       f"throughput measured on 2 cores; add --yes to run it anyway)")
