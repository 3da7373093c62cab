"""`python -m dino_scale.train` (and `deepspeed -m` / `torchrun -m`): the train command."""

from dino_scale.train.command import main

main()
