"""Evaluation of frozen features: k-NN, linear probe, copy detection and attention maps, with JSON reports."""
