"""lora-on-the-go: training-free, instance-level dynamic LoRA selection and merging (LoGo)."""

__version__ = "0.1.0"
