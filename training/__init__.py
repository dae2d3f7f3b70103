"""Training on Ray Train + DeepSpeed: HF causal LMs, full fine-tuning, pretraining, LoRA / QLoRA."""
