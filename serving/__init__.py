"""Serving on Ray Serve: quantized HF models, LoRA multiplexing, dynamic batching, OpenAI API."""
