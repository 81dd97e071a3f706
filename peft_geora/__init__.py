"""GeoRA (Geometry-Aware Low-Rank Adaptation) as a PEFT method.

``import peft_geora`` registers ``PeftType.GEORA`` with PEFT, after which ``get_peft_model(model, GeoRAConfig())``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` know GeoRA. The package is layered, each layer
importing only the ones below it (``docs/architecture.md``):

* :mod:`peft_geora.functional`: the initialisation math, torch only;
* :mod:`peft_geora.format`: the on-disk checkpoint format, base-weight fingerprints and the model card;
* :mod:`peft_geora.tuner`: the PEFT tuner (config, layers, anchors, experts, quantized bases, distributed);
* :mod:`peft_geora.sharing`: the LoRA export, ``push_to_hub`` and TRL's vLLM adapter sync;
* :mod:`peft_geora.diagnostics`: spectral diagnostics of an update and the Trainer callback.

The applications (the ``peft-geora`` command line, ``inspect``, the demo and its task) are the separate package
:mod:`peft_geora_apps`.

The public API is what this module exports (``docs/api.md``).
"""

from .tuner.registry import geora_peft_type, register  # noqa: I001  (the enum member must exist first)
from .diagnostics.callback import GeoRADiagnosticsCallback
from .format.fingerprint import BaseModelMismatchError, BaseModelMismatchWarning, base_check
from .functional import geora_decompose, geora_init_factors, geora_masks
from .sharing import vllm_sync
from .sharing.export import export_lora, save_as_lora
from .sharing.hub import push_to_hub
from .tuner.anchor import AnchoredA, AnchoredB
from .tuner.config import GeoRAConfig
from .tuner.layer import GeoRALayer, GeoRALinear
from .tuner.model import GeoRAModel

geora_peft_type()
register(config_cls=GeoRAConfig, model_cls=GeoRAModel)
vllm_sync.install()

__version__ = "0.1.0"

__all__ = [
    "AnchoredA",
    "AnchoredB",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "GeoRAConfig",
    "GeoRADiagnosticsCallback",
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
