"""Tests of peft_geora.diagnostics: spectral metrics and the Trainer callback."""
