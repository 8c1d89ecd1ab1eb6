"""nanotune quant/: NF4 + double quantization (bitsandbytes-compatible), NF4Linear, CUDA dequant, QLoRA."""
