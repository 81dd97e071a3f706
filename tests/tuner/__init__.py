"""Tests of peft_geora.tuner: the PEFT glue (config, registry, anchors, layers, experts, quantized, save/load)."""
