"""The public ops of dmpo_fast (see shared design: eager reference + chunked torch + Triton)."""
