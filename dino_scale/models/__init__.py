"""Networks: timm backbones, the DINO head and student / teacher pair, where weights come from, frozen features."""
