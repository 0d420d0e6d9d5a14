"""What runs the network for the scripts: one training step, and a trained snapshot made a ready model."""
