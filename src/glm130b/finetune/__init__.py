"""Supervised fine-tuning: every weight, LoRA (PEFT) or P-tuning v2 prefixes, over a frozen
INT4/INT8 base for the adapters, with the pretraining recipe's trainer underneath (docs/finetune.md)."""
