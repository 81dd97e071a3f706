"""The on-disk format of a GeoRA adapter: checkpoint keys, version and validation (:mod:`.checkpoint`), base-weight
fingerprints and the load policy (:mod:`.fingerprint`), and the model card (:mod:`.card`). Below the PEFT tuner,
which reads and writes it; nothing here imports PEFT's tuner classes or GeoRA's."""
