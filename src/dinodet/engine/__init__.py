"""Training machinery: train (the loop), step (TrainState, train_step), config, optim, ema,
checkpoint, distributed, evaluate, plot, demo. Import the submodules directly; this
package imports nothing itself, so ``import dinodet.engine`` stays cheap."""
