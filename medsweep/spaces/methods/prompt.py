"""Visual prompt tuning: no medical table; the FPT pipeline's training with VPT-deep, 10 prompts."""

from optuna.distributions import CategoricalDistribution

from medsweep.spaces._record import MethodSpace
from medsweep.spaces._rules import Rule
from medsweep.spaces.tables import FPT_TRAINING

SPACE = MethodSpace(
    name="prompt",
    order=70,
    rules={
        "num_prompts": Rule(int, low=1),
        "deep": Rule(bool),
        "prompt_dropout": Rule(float, low=0, high=1, high_open=True),
    },
    # The FPT works ran VPT as a baseline in their pipeline; lr 1e-3 and 10 deep prompts are
    # reasonable defaults, not published for these data (the config's default, 16 deep prompts,
    # is the count FPT's 0.17% baseline implies; the space searches both).
    recommended={**FPT_TRAINING, "lr": 1e-3, "num_prompts": 10, "deep": True},
    source="FPT pipeline training setup; AdamW lr 1e-3 and VPT-deep with 10 prompts (reasonable defaults, not published for medical data)",
    searched={  # VPT's prompt lengths (1-100 of its grid), shallow or deep
        "num_prompts": CategoricalDistribution((1, 5, 10, 50, 100)),
        "deep": CategoricalDistribution((True, False)),
    },
)
