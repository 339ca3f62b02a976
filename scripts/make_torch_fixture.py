"""Writes the PyTorch fixtures brisk-models' equivalence test compares against.

Run by hand (needs torch, torchvision, safetensors), from the repository root:

    python3 scripts/make_torch_fixture.py

For each fixture model (narrow, so that the committed files stay small) it writes, under
crates/brisk-models/tests/fixtures/:
  NAME.safetensors       the weights under torchvision's names (num_batches_tracked kept,
                         as torchvision saves them), with non-trivial batch-norm state;
  NAME.json              brisk's sidecar holding the ModelSpec;
  NAME.io.safetensors    `input`, `logits_eval`, `logits_train` and `after.<bn>.running_*`,
                         the running statistics after one train-mode forward of `input`.

The model is scripts/torch_reference.py's torchvision-named ResNet (BasicBlock, CIFAR or
ImageNet stem, width multiplier, SE block with its ratio), brisk's ModelSpec in PyTorch.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import torch_reference as ref  # noqa: E402

OUT = os.path.join(ROOT, "crates", "brisk-models", "tests", "fixtures")


def build(arch, width, se_ratio, classes, stem):
    return ref.ResNet(arch, classes, width, stem, se_ratio=se_ratio)


def scramble_batch_norm(model, gen):
    """Random affine parameters and running statistics, so eval and train modes differ."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def write(name, arch, width, se_ratio, stem="cifar", classes=10, batch=4, size=16):
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    model = build(arch, width, se_ratio, classes, stem)
    scramble_batch_norm(model, gen)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, f"{name}.safetensors"))
    spec = {"arch": arch, "stem": stem, "classes": classes, "width": width,
            "se_ratio": se_ratio, "image_size": size}
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump({"format": "brisk-model", "version": 1, "spec": spec}, f, indent=2)

    x = torch.randn(batch, 3, size, size, generator=gen)
    model.eval()
    with torch.no_grad():
        logits_eval = model(x)
    model.train()
    with torch.no_grad():
        logits_train = model(x)
    io = {"input": x, "logits_eval": logits_eval, "logits_train": logits_train}
    for k, v in model.state_dict().items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            io[f"after.{k}"] = v.clone()
    save_file(io, os.path.join(OUT, f"{name}.io.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n} parameters")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    write("resnet18_w0125", "resnet18", 0.125, 16)
    write("seresnet18_w0125", "seresnet18", 0.125, 4)
    # The ImageNet stem (7x7/2 conv, 3x3/2 max-pool) at 1/16 width, on 40x40 images.
    write("resnet18_imagenet_w00625", "resnet18", 0.0625, 16, stem="imagenet", size=40)
