"""raylm compress: calibrated quantization and pruning of a trained model."""
