"""Loads a brisk checkpoint into torchvision's own resnet18 and compares logits.

Run by hand (needs torch and torchvision), after writing a probe:

    cargo run --release -p brisk-models --example write_probe -- resnet18-cifar /tmp/probe
    python3 scripts/check_torchvision_load.py /tmp/probe

For the CIFAR presets the stem is swapped for a 3x3/1 conv and the max-pool removed.
The weights load with load_state_dict(strict=True): the JSON sidecar is the only
file left aside.
"""

import json
import os
import sys

import torch
import torchvision
from safetensors.torch import load_file


def main(probe_dir):
    spec = json.load(open(os.path.join(probe_dir, "model.json")))["spec"]
    if spec["arch"] not in ("resnet18", "resnet34"):
        sys.exit(f"torchvision has no {spec['arch']}")
    model = getattr(torchvision.models, spec["arch"])(num_classes=spec["classes"])
    if spec.get("stem", "imagenet") == "cifar":
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    state = load_file(os.path.join(probe_dir, "model.safetensors"))
    model.load_state_dict(state, strict=True)
    model.eval()
    probe = load_file(os.path.join(probe_dir, "probe.safetensors"))
    with torch.no_grad():
        ours = model(probe["input"])
    ref = probe["logits"]
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"torchvision {spec['arch']} ({spec.get('stem')}) loaded strictly; "
          f"max relative logit difference {rel:.2e}")
    sys.exit(0 if rel < 1e-4 else 1)


if __name__ == "__main__":
    main(sys.argv[1])
