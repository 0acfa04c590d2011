"""Training machinery: config, optimiser and schedule, EMA, checkpoints, distributed helpers.

Import the submodules directly (``from dinodet.engine.config import load_train_config``);
this package imports nothing itself, so ``import dinodet.engine`` stays cheap.

    config        TrainConfig / DataConfig / OptimConfig and ``load_train_config``
    optim         parameter groups, AdamW, the iteration-based LR schedule, gradient clipping
    ema           ModelEMA, an exponential moving average of the weights
    checkpoint    atomic save, ``weights_only`` load, CheckpointManager, RNG state
    distributed   torchrun process group, collectives, seeding
    evaluate      COCO box evaluation
"""
