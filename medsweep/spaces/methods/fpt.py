"""FPT (MICCAI 2024): official training defaults, side input 7/16 of the 512 px frozen input."""

from medsweep.spaces._record import MethodSpace
from medsweep.spaces.methods import _fine_grained as fine

SPACE = MethodSpace(
    name="fpt",
    order=40,
    rules=fine.RULES,
    recommended=fine.recommended(side_image_size=224),
    source="FPT official training defaults (20 epochs, batch 16, AdamW wd 0.1, clip 1, keep 0.2, 16 prompts, side 224 px)",
    searched=fine.SEARCHED,
    checks=(fine.keep_within_preload,),
    launch_rules=fine.LAUNCH_RULES,
    recommend=fine.recommend,
)
