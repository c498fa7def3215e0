"""Sampling and compilation settings shared by every stage that runs the generator (pydantic-typed, no Ray)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator

Sampler = Literal["dpm++", "ddim", "plms"]
"""DPM-Solver++ (few steps), DDIM, or PLMS (the paper's sampler, 250 steps)."""


def _compile_setting(value: object) -> object:
    if isinstance(value, bool) or value == "reduce-overhead":
        return value
    raise ValueError("expected false, true or reduce-overhead")


Compile = Annotated[bool | Literal["reduce-overhead"], BeforeValidator(_compile_setting)]
"""A stage's `compile`: false (eager), true (torch.compile: fused kernels) or "reduce-overhead" (compiled and
replayed as CUDA graphs, which removes the host's kernel launches; GPU only, the fastest there)."""

COMPILE_SAMPLING_HELP = (
    "torch.compile the UNet and VAE decoder (true, or reduce-overhead: + CUDA graphs); the first call of each new "
    "batch shape pays the compile time (docs/benchmarks.md has the figures)"
)


def torch_compile_mode(setting: Compile) -> str | None:
    """torch.compile's `mode` for a true `compile` setting: None (its default) for true, else the setting."""
    return None if setting is True else str(setting)
