"""dmpo_fast: fast RL fine-tuning of diffusion language models (DMPO and MRO)."""

__version__ = "0.1.0"
