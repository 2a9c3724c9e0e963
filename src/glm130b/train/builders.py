"""The model and optimizer of a training launch, built one way for every launch: the GLM on its
device with the seeded GLM-130B init, then what the launch needs (compile and recomputation in one
process; under torchrun the parallelized model or this rank's pipeline stage), then AdamW."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from glm130b.core.errors import GLMError
from glm130b.distributed.parallelize import (
    ParallelConfig,
    apply_activation_checkpointing,
    apply_compile,
    build_mesh,
    init_distributed,
    parallelize,
)
from glm130b.distributed.pipeline import PipelineRunner
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.model.initialization import initialize_glm
from glm130b.train.config import TrainConfig
from glm130b.train.optim import build_optimizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter before any activation.
TRAINING_BYTES_PER_PARAMETER = 16


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new model on `device` (CUDA: the driver's count; CPU: MemAvailable of
    /proc/meminfo); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_model_fits(model_config: GLMConfig, device: torch.device, processes: int = 1) -> None:
    """Refuse, before allocating anything, a model whose training state alone (every process
    builds the whole model first) exceeds the device's free memory: the alternative is a machine
    that swaps or a process the kernel kills, with nothing printed."""
    free = available_memory(device)
    if free is None:
        return
    with torch.device("meta"):
        parameters = GLM(model_config).num_parameters()
    needed = parameters * TRAINING_BYTES_PER_PARAMETER * (processes if device.type == "cpu" else 1)
    if needed > free:
        raise GLMError(
            f"a {parameters / 1e9:.2f}B-parameter model needs {needed / 2**30:,.1f} GiB on {device} for fp32 "
            f"weights, gradients and AdamW state before any activation; {free / 2**30:,.1f} GiB are free. "
            "Choose a smaller model (--config configs/demo.yaml, or --model_preset glm-10m), or plan a "
            "multi-GPU run with `glm130b plan`"
        )


@dataclass
class TrainingModel:
    """What the Trainer trains: the model (a GLM, or this rank's pipeline stage of one) and its
    optimizer; in a torchrun launch also the [pp, dp, tp] DeviceMesh and, with pp > 1, the
    pipeline runner."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh
    runner: PipelineRunner | None = None


def build_model_and_optimizer(
    config: TrainConfig,
    model_config: GLMConfig | None = None,
    make_model: Callable[[torch.device], nn.Module] | None = None,
) -> TrainingModel:
    """The model and AdamW of this launch. One process (RANK unset): the model on config.device.
    Under torchrun (RANK set, whatever the process count): the process group (nccl on CUDA with
    each rank on cuda:LOCAL_RANK, gloo on CPU), the mesh of config.parallel, and the same seeded
    full model on every rank (so every rank starts from identical weights), then parallelized, or
    cut into this rank's pipeline stage when parallel.pp > 1. Models too large to materialise
    whole per rank need a meta-device build and a checkpoint instead (docs/distributed.md).
    `make_model(device)`: the model of every rank instead of the seeded fresh GLM (a fine-tune
    loads its base there); AdamW then takes only the parameters that require gradients."""
    model_config = model_config or config.model_config()
    device = resolve_device(config.device)
    mesh, pcfg = None, config.parallel
    if "RANK" in os.environ:
        device, pcfg = _join_process_group(config, model_config, device)
        mesh = build_mesh(pcfg, device.type)
    if make_model is not None:
        model = make_model(device)
    else:
        check_model_fits(model_config, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        with torch.device(device):
            model = GLM(model_config)
        initialize_glm(model, seed=config.seed)
    runner = None
    if mesh is None:  # parallelize's order: compile, then recomputation around the compiled blocks
        if pcfg.compile:
            apply_compile(model)
        if pcfg.activation_checkpointing:
            apply_activation_checkpointing(model)
    elif pcfg.pp > 1:
        runner = PipelineRunner(model, mesh, pcfg, device)  # turns `model` into this rank's stage
    else:
        parallelize(model, mesh, pcfg)
    return TrainingModel(model, build_optimizer(model, config), mesh, runner)


def _join_process_group(
    config: TrainConfig, model_config: GLMConfig, device: torch.device
) -> tuple[torch.device, ParallelConfig]:
    """Initialise torch.distributed for this rank; its device and the validated degrees."""
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    world = dist.get_world_size()
    pcfg = config.parallel.resolve(world)
    if pcfg.pp > 1:
        pcfg = pcfg.with_microbatches(config.global_batch_size, config.micro_batch_size)
    return device, pcfg.validate(model_config, world)
