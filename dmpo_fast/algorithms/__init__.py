"""The algorithms behind ``dmpo-fast train``, registered by the name ``TrainConfig.algorithm`` takes.

Each is a class behind one small interface (``dmpo_fast.algorithms.base.Algorithm``): build a buffer
from a batch of rollouts and rewards, the loss of a buffer slice, its log columns, what it needs (a
reference model, a perplexity scorer) and the checks of its own config fields. Adding one is a new module
plus its config fields and a line here (docs/architecture.md walks through wd1).
"""

from dmpo_fast.algorithms.base import Algorithm, Buffer, derive_seed
from dmpo_fast.algorithms.diffu_grpo import DiffuGRPO
from dmpo_fast.algorithms.dmpo import DMPO, DMPOOptions
from dmpo_fast.algorithms.mro import MRO
from dmpo_fast.algorithms.mro_rs import MRORejectionSampling
from dmpo_fast.algorithms.rejection_sft import RejectionSFT
from dmpo_fast.algorithms.wd1 import WD1

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (DMPO, MRO, DiffuGRPO, RejectionSFT, WD1,
                                                                 MRORejectionSampling)}


def get(name: str) -> type[Algorithm]:
    """The algorithm class registered as ``name``."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"algorithm must be one of {', '.join(map(repr, ALGORITHMS))}, got {name!r}"
        ) from None


__all__ = ["ALGORITHMS", "Algorithm", "Buffer", "DMPO", "DMPOOptions", "DiffuGRPO", "MRO", "MRORejectionSampling", "RejectionSFT", "WD1",
           "derive_seed", "get"]  # fmt: skip
