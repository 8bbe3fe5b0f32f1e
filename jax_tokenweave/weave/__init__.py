"""TokenWeave's split schedule: when and where a batch is cut in two (`split`), and the overlapped
layer that runs one half's fused collective beside the other half's compute (`schedule`). Both
call the model's layer functions (`jax_tokenweave.models.layers`); nothing here holds weights."""
from jax_tokenweave.weave.split import *  # noqa: F401,F403
