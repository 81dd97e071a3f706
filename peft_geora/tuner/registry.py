"""Teach PEFT about GeoRA: a ``PeftType.GEORA`` member and the ``PEFT_TYPE_TO_*`` mappings.

``peft.register_peft_method`` only accepts names already in PEFT's closed ``PeftType`` enum and refuses a prefix
that is taken; GeoRA must use LoRA's ``"lora_"`` prefix (TRL's vLLM sync and PEFT's device placement key on it), so
the member and the mappings are added here. Both steps are idempotent: importing twice, reloading, or a PEFT that
already defines ``GEORA`` are all fine.
"""

from __future__ import annotations

import logging

from peft.utils import PeftType

logger = logging.getLogger(__name__)

NAME = "GEORA"
PREFIX = "lora_"


def geora_peft_type() -> PeftType:
    """Return ``PeftType.GEORA``, adding the member to PEFT's enum the first time."""
    existing = PeftType.__members__.get(NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, NAME)
    member._name_ = NAME
    member._value_ = NAME
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[NAME] = member
    PeftType._value2member_map_[NAME] = member
    PeftType._member_names_.append(NAME)
    type.__setattr__(PeftType, NAME, member)
    return member


def register(config_cls: type, model_cls: type) -> None:
    """Map ``PeftType.GEORA`` to GeoRA's config, tuner and prefix in PEFT's lookup tables."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = geora_peft_type()
    previous = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if previous is not None and previous is not model_cls:
        logger.debug("replacing PEFT's %s tuner %r with %r", NAME, previous, model_cls)
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
