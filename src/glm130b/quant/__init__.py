"""Weight-only INT8/INT4 quantization: the number format, QuantizedLinear and its kernels."""
