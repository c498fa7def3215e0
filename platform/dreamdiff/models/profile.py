"""`profile`: whose forward passes a model runs, ours (the default) or the DreamDiffusion reference code's.

"dreamdiff" is this platform's default. "reference" reproduces the reference code's computations so that its
released weights give its outputs (docs/reference-parity.md lists every difference):
- the EEG encoder's LayerNorms use eps 1e-5 (ours 1e-6), and downstream (fine-tuning, sampling) the encoder runs
  without its cls token (ours prepends it and drops it after the blocks);
- the UNet's time embedding gets a learned term computed from the EEG context (`TimeConditioner`);
- PLMS runs the reference's timesteps (leading spacing, offset 1: 1, 5, ..., 997 for 250 steps);
- ImageNet-EEG windows are cropped to samples 20-460 and linearly interpolated to 512, with no filter and no
  normalisation, and trials outside 450-600 samples are dropped.
"""

from __future__ import annotations

from typing import Literal

Profile = Literal["dreamdiff", "reference"]
