"""Adapters on a GLM: LoRA through PEFT and P-tuning v2 prefixes; their folders, loading one onto
its base model, merging LoRA into the weights. Training them is glm130b.finetune's job."""
