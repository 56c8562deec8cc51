"""Dense -> MoE upcycling of checkpoints, with a function-preservation check.

  convert.py  the weight math on global state dicts (expert copies, granularity, router init,
              weight scaling) and the option checks
  source.py   dense sources: our checkpoints (any layout) and Hugging Face Llama folders
  verify.py   the logits comparison on a seeded sample batch
  save.py     the step-0 training checkpoint (fresh optimizer)
  carry.py    optionally, the dense run's Adam moments carried into the experts
  api.py      ``upcycle(...)`` -> ``UpcycleReport``: what ``mm1-moe upcycle`` runs
"""

from .api import UpcycleReport, upcycle
from .convert import UpcycleError, UpcyclePlan, expected_exact, make_plan, upcycle_state_dict

__all__ = ["UpcycleError", "UpcyclePlan", "UpcycleReport", "expected_exact", "make_plan",
           "upcycle", "upcycle_state_dict"]
