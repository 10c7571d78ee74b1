"""Benchmark building blocks: timing inside generate, the official PEFT path, ratios and the report table."""
