"""Tests of peft_geora.sharing: the LoRA export, push_to_hub, the vLLM adapter sync."""
