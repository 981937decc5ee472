"""BitFit: no medical table; the FPT pipeline's training with AdamW lr 1e-3 (biases and head only)."""

from medsweep.spaces._record import MethodSpace
from medsweep.spaces.tables import FPT_TRAINING

SPACE = MethodSpace(
    name="bitfit",
    order=80,
    rules={},
    # As prompts and adapters: the training setup the FPT works ran their baselines in, with the
    # lr of a head-sized set of learnable parameters (lr and weight decay are searched x/÷10).
    recommended={**FPT_TRAINING, "lr": 1e-3},
    source="FPT pipeline training setup; AdamW lr 1e-3 on the biases and head (a reasonable default, not published for medical data)",
)
