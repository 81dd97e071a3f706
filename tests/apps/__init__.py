"""Tests of peft_geora_apps: the command line, inspect, the demo and its tasks."""
