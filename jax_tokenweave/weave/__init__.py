"""TokenWeave's split schedule: when and where a batch is cut in two (`split`), and the overlapped
layer that runs one half's fused collective beside the other half's compute (`schedule`). Both
call the model's layer functions (`jax_tokenweave.models.layers`); nothing here holds weights."""
from jax_tokenweave.weave.schedule import overlap_pair, split_forward, split_layer, use_overlap
from jax_tokenweave.weave.split import (WEAVE_TABLE, SplitConfig, SplitPlan, config_for, load_table, model_key,
                                        plan_split, split_point)

__all__ = ["SplitConfig", "SplitPlan", "WEAVE_TABLE", "config_for", "load_table", "model_key", "plan_split",
           "split_point", "overlap_pair", "split_forward", "split_layer", "use_overlap"]
