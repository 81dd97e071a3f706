"""GeoRA as a PEFT tuner: the config, the anchored factors, the layers (dense, stacked experts, bitsandbytes), the
model that injects them, and the distributed and load-time checks they need."""
