"""Tests of peft_geora.format: the checkpoint format, base-weight fingerprints, the model card."""
