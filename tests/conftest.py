"""The parity table: tests record max |diff| against transformers per check; every run prints it at the end.
(Config builders live in `blip2_hf.testing_utils`, shared with the benchmarks.)"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from blip2_hf.testing_utils import (  # noqa: F401  (re-exported for the test modules)
    IMAGE_TOKEN,
    perturb_,
    salesforce_config_dict,
    tiny_config_dict,
)

# ---------------------------------------------------------------------------------------------------------------------
# The parity table: tests record max |diff| per check; the end of every run prints it.
# ---------------------------------------------------------------------------------------------------------------------

PARITY: dict[str, float] = defaultdict(float)


@pytest.fixture
def record_parity():
    def record(check: str, a: torch.Tensor, b: torch.Tensor) -> float:
        diff = (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0
        PARITY[check] = max(PARITY[check], diff)
        return diff

    return record


def pytest_terminal_summary(terminalreporter):
    if not PARITY:
        return
    terminalreporter.section("parity (max |diff|) with transformers' BLIP-2 and with the stage-1 formulas")
    width = max(len(k) for k in PARITY)
    for check, diff in sorted(PARITY.items()):
        terminalreporter.write_line(f"{check:<{width}}  {diff:.3e}")
