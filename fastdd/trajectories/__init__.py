"""Expert trajectories: training the experts (plain or sharpness-aware), and their files."""
