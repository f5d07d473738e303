"""Training: `nanoseek train` with every DeepSeek-V3 objective on a real corpus, resumable and observable.

    from nanoseek.train import TrainConfig, train
    result = train(TrainConfig(steps=100, balance="aux"), "runs/aux")   # a run directory (HF checkpoint + state)

Modules: config (TrainConfig), data (corpus, tokenization cache, packing, batches), tokenizer_train (BPE),
optim (AdamW groups, schedules), checkpoint (atomic run directories), loop (the Trainer), metrics
(metrics.jsonl), report (report.md + plots), sample (a short completion), cli (the subcommands).
"""

from .config import TrainConfig
from .loop import TrainingError, TrainResult, Trainer, resume_config, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingError", "resume_config", "train"]
