"""flashgdn: CuTe DSL kernels for the decode step of Gated Delta Net linear attention."""
__version__ = "0.1.0"

from .api import (
    gated_delta_rule_decode,
    gated_delta_rule_decode_pretranspose,
    gated_delta_rule_mtp,
)
from .replay import gated_delta_rule_replayssm_commit
from .device import UnsupportedGPUError
from .fused_step import gdn_fused_decode_step
from . import reference
from . import ops  # registers the torch.library ops that traced calls use (flashgdn.ops)

__all__ = [
    "gated_delta_rule_decode_pretranspose",
    "gated_delta_rule_decode",
    "gated_delta_rule_mtp",
    "gdn_fused_decode_step",
    "gated_delta_rule_replayssm_commit",
    "reference",
    "UnsupportedGPUError",
    "__version__",
]
