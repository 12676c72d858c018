"""Training one task's adapter on the frozen backbone, through the very wiring the server serves with.

The trainer installs the same routed modules as the engine (`install_sites`) and drives them with a
`TrainablePlan`, whose deltas come from the file's own tensors through `spec.dense` (`spec.low_rank`
for LoRA), the functions serving computes a loaded file with. So the tensors that are optimized
are exactly the tensors written to the native file, and the server's outputs on that file match the
trainer's held-out predictions (one code path, not a re-implementation).

One module per concern: `data` (examples and the split), `trainable` (the plan the sites call), `session`
(the routed backbone: batches, loss, greedy outputs, evaluation), `fit` (options, the epochs, the result),
`upload` (pushing the file to a server).
"""

from .data import Example, read_examples, split_examples
from .fit import TrainConfig, TrainResult, open_session, run_epoch, torch_threads, train
from .session import Session, evaluate
from .trainable import TrainablePlan
from .upload import upload

__all__ = [
    "Example",
    "Session",
    "TrainConfig",
    "TrainResult",
    "TrainablePlan",
    "evaluate",
    "open_session",
    "read_examples",
    "run_epoch",
    "split_examples",
    "torch_threads",
    "train",
    "upload",
]
