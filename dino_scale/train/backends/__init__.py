"""Training backends behind one interface (`Backend`): local, ddp, deepspeed, fsdp. See base.py for the contract."""

from __future__ import annotations

from dino_scale.config import TrainConfig
from dino_scale.errors import Unavailable
from dino_scale.train.backends.base import Backend, LaunchEnvironment, launch_environment
from dino_scale.train.backends.local import DDPBackend, LocalBackend

__all__ = [
    "Backend",
    "DDPBackend",
    "LaunchEnvironment",
    "LocalBackend",
    "choose_backend",
    "launch_environment",
    "make_backend",
]


def choose_backend(requested: str, env: LaunchEnvironment) -> str:
    """`auto`: the deepspeed launcher -> deepspeed; any other multi-process launch -> ddp; one process -> local."""
    if requested != "auto":
        return requested
    if env.launcher == "deepspeed":
        return "deepspeed"
    return "ddp" if env.world_size > 1 else "local"


def make_backend(cfg: TrainConfig) -> Backend:
    """Create the backend the recipe (or the launcher) asks for; fails with a clear message before any step."""
    env = launch_environment()
    name = choose_backend(cfg.backend, env)
    batch = cfg.batch_plan(env.world_size)  # raises when micro batch x world size cannot make the global batch
    if name == "local":
        return LocalBackend(cfg, batch)
    if name == "ddp":
        return DDPBackend(cfg, batch)
    if name == "deepspeed":
        from dino_scale.train.backends.deepspeed import DeepSpeedBackend  # imports deepspeed: only when asked for

        return DeepSpeedBackend(cfg, batch)
    if name == "fsdp":
        from dino_scale.train.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg, batch)
    raise Unavailable(f"backend={name!r} is not one of auto, local, ddp, deepspeed, fsdp")
