"""The PyTorch side of tests/tools/test_timm_parity.py: for each timm model named, a randomly
initialised model whose BatchNorm layers are randomised too (scale, shift and running
statistics, so no BN is the identity and no block starts as one; scales below 1 keep the deep
all-attention halonet_h1 well-conditioned: with larger ones its float32 logits differ from its
own float64 ones by 5e-4), saved as safetensors, with its
eval-mode logits and stage outputs on random inputs. Runs in its own process: torch and
TensorFlow do not share one.

Usage: timm_reference.py OUT_DIR MODEL:IMAGE_SIZE...
Writes OUT_DIR/MODEL.safetensors and OUT_DIR/MODEL.npz (inputs NHWC, logits, stage1..stage4 NHWC).
"""

import os
import sys

import numpy as np
from safetensors.torch import save_file
import timm
import torch

out_dir, models = sys.argv[1], sys.argv[2:]
torch.manual_seed(0)
for name, size in (model.split(':') for model in models):
  size = int(size)
  model = timm.create_model(name, pretrained=False).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.4, 0.8)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(1.0, 2.0)
    images = torch.randn(2, 3, size, size)
    logits = model(images)
    x = model.stem(images)
    stages = {}
    for i, stage in enumerate(model.stages, 1):
      x = stage(x)
      stages[f'stage{i}'] = x.permute(0, 2, 3, 1).numpy()
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(out_dir, f'{name}.safetensors'))
  np.savez(
    os.path.join(out_dir, f'{name}.npz'),
    images=images.permute(0, 2, 3, 1).numpy(),
    logits=logits.numpy(),
    **stages,
  )
