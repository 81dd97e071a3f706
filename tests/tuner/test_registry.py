"""PEFT knows GeoRA after ``import peft_geora``: the ``PeftType`` member and the mappings, also when imported twice,
reloaded, or when PEFT already defines the member."""

from __future__ import annotations

import subprocess
import sys

from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from peft_geora import GeoRAConfig, GeoRAModel


def test_peft_mappings_know_geora():
    assert PeftType("GEORA") is PeftType.GEORA
    assert "GEORA" in [member.value for member in PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GEORA] is GeoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.GEORA] is GeoRAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.GEORA] == "lora_"


def test_import_twice_is_harmless():
    # in a fresh interpreter, so that reloaded classes do not leak into the other tests
    code = (
        "import importlib, sys\n"
        "import peft_geora\n"
        "from peft import PeftType, get_peft_model\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "member = PeftType.GEORA\n"
        "import peft_geora\n"
        "for name in ('peft_geora.tuner.registry', 'peft_geora'):\n"
        "    importlib.reload(sys.modules[name])\n"
        "assert PeftType.GEORA is member and list(PeftType).count(member) == 1\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is sys.modules['peft_geora'].GeoRAConfig\n"
        "import torch\n"
        "config = peft_geora.GeoRAConfig(r=2, target_modules=['0'])\n"
        "model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), config)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_import_after_peft_already_knows_geora():
    code = (
        "from peft.utils import PeftType\n"
        "import peft.utils.peft_types as pt\n"
        "from peft_geora.tuner.registry import geora_peft_type\n"
        "member = geora_peft_type()\n"  # as if PEFT itself defined GEORA already
        "import peft_geora\n"
        "from peft import get_peft_model\n"
        "assert PeftType.GEORA is member\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
