from dino_scale.cli import main

main()
