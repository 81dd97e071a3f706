"""GeoRA (Geometry-Aware Low-Rank Adaptation) as a PEFT method.

``import peft_geora`` registers ``PeftType.GEORA`` with PEFT, after which ``get_peft_model(model, GeoRAConfig())``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` know GeoRA. The initialisation math lives in
:mod:`peft_geora.functional` and needs only torch.
"""

from .registry import geora_peft_type, register  # noqa: I001  (the enum member must exist first)
from .anchor import AnchoredA, AnchoredB
from .config import GeoRAConfig
from .export import export_lora, save_as_lora
from .fingerprint import BaseModelMismatchError, BaseModelMismatchWarning, base_check
from .functional import geora_decompose, geora_init_factors, geora_masks
from .layer import GeoRALayer, GeoRALinear
from .hub import push_to_hub
from .model import GeoRAModel
from . import trl_support

geora_peft_type()
register(config_cls=GeoRAConfig, model_cls=GeoRAModel)
trl_support.install()

__version__ = "0.1.0"

__all__ = [
    "AnchoredA",
    "AnchoredB",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "GeoRAConfig",
    "GeoRALayer",
    "GeoRALinear",
    "GeoRAModel",
    "base_check",
    "export_lora",
    "geora_decompose",
    "geora_init_factors",
    "geora_masks",
    "push_to_hub",
    "save_as_lora",
]
