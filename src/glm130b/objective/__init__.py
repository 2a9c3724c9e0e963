"""The GLM pretraining objective: sample builders ([gMASK], [MASK], MIP), batches, the sampler, the loss."""
