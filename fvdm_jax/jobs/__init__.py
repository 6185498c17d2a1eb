"""The jobs of `--mode` (train, sample, eval, encode, export) and the verdict: the layer on top.
Jobs import the engine (models, diffusion, data, sampling, evaluation, train loop); the engine
imports no job."""
