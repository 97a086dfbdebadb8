"""A robot-control policy served by deskpod's Triton-compatible API: a small GRU that takes the robot's last
observation and keeps its recurrent state on the server (the sequence batcher's implicit state), one sequence
per robot.

    python examples/robot_policy/make_repository.py models/      # writes models/gru_policy/
    deskpod serve --model-repository models/                     # HTTP :8000, gRPC :8001
    python benchmarks/robots.py                                  # 4 robots at 100 Hz over gRPC streams

The policy's weights are random (seeded): the point is the serving path — state, ordering, latency.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

OBSERVATION, HIDDEN, ACTION = 16, 64, 4

CONFIG = f"""
name: "gru_policy"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ {{ name: "OBS__0" data_type: TYPE_FP32 dims: [ {OBSERVATION} ] }} ]
output [ {{ name: "ACTION__0" data_type: TYPE_FP32 dims: [ {ACTION} ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: 5000000
  direct {{ }}
  state [ {{ input_name: "STATE__1" output_name: "STATE_OUT__1" data_type: TYPE_FP32 dims: [ {HIDDEN} ]
            initial_state: {{ data_type: TYPE_FP32 dims: [ {HIDDEN} ] zero_data: true name: "zeros" }} }} ]
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


class GRUPolicy(nn.Module):
    """action, new state = policy(observation, state)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(OBSERVATION, HIDDEN)
        self.head = nn.Linear(HIDDEN, ACTION)

    def forward(self, observation: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.cell(observation, state)
        return torch.tanh(self.head(state)), state


def write(root: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder = root / "gru_policy"
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(CONFIG)
    torch.jit.script(GRUPolicy().eval()).save(str(folder / "1" / "model.pt"))
    return folder


if __name__ == "__main__":
    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else "models")))
