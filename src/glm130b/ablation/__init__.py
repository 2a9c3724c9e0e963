"""`glm130b ablate`: the paper's training-stability choices as a grid of small runs and a report."""
