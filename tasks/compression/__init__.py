"""Edge compression: ONNX export with parity checks, int8 quantization and side-by-side measurement."""
