from dino_scale.cli import run

run()
