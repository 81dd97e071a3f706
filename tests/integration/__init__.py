"""End-to-end tests across layers: TRL / GRPO, the real SmolLM2, distributed launches, transformers' adapter
API, bf16 precision, combining adapters."""
