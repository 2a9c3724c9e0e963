"""Scaling out: parallel degrees and the device mesh, tensor parallel, FSDP2, pipeline stages, DCP
checkpoints, the memory plan."""
