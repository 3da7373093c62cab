"""Training: the loop (loop.py), its state (state.py), loss, optimizer, schedules, teacher EMA, metrics, checkpoints,
and the backends behind one interface (backends/). `python -m dino_scale.train` runs the train command."""
