"""The applications: train, evaluate, predict, pretrain, export — what tools/ and Python users call."""
