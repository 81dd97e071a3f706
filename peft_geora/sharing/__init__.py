"""Sharing a trained adapter: the LoRA export (:mod:`.export`), ``push_to_hub`` (:mod:`.hub`) and TRL's adapter-only
vLLM sync (:mod:`.vllm_sync`)."""
