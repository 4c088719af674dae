"""The PyTorch side of tests/models/test_timm_modules.py: timm's attention modules (the survey's, as
timm implements them), randomly initialised with randomised BatchNorm (eval mode), each saved
with its output on a random input. Runs in its own process: torch and TensorFlow do not share one.

Usage: timm_modules.py OUT_DIR
Also the deep and tiered stems of timm's 'd'/'t' ResNets and their average-pooled shortcut.
Writes OUT_DIR/CASE.npz per case: x and y (NHWC) and the state dict as 'state/KEY'; and
OUT_DIR/networks.npz: the parameter count of each timm network named in NETWORKS.
"""

import os
import sys

import numpy as np
import timm
from timm.layers import ConvMlp
from timm.layers import create_conv2d
from timm.layers import make_divisible
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.cbam import CbamModule
from timm.layers.cond_conv2d import CondConv2d
from timm.layers.eca import EcaModule
from timm.layers.gather_excite import GatherExcite
from timm.layers.selective_kernel import SelectiveKernel
from timm.layers.split_attn import SplitAttn
from timm.layers.squeeze_excite import SEModule
from timm.models.resnet import downsample_avg
import torch

CHANNELS, SIZE = 32, 8
NETWORKS = (
  'resnet50',
  'seresnet50',
  'skresnet50',
  'resnet50d',
  'ecaresnet50d',
  'ecaresnet50t',
  'resnest50d',
)


class RoutedCondConv(torch.nn.Module):
  """CondConv as timm's EfficientNet blocks route it: sigmoid(linear(pooled input))."""

  def __init__(self, channels, experts):
    super().__init__()
    self.routing = torch.nn.Linear(channels, experts)
    self.conv = CondConv2d(channels, channels, 3, num_experts=experts)

  def forward(self, x):
    return self.conv(x, torch.sigmoid(self.routing(x.mean((2, 3)))))


def gather_excite(use_mlp):
  """GatherExcite with extra_params and global extent, with or without its MLP. timm 1.0's
  constructor fails on either (it passes its device/dtype dict positionally), so the gather and
  MLP are built here as the constructor means to, but for the gather's padding: unpadded, so the
  map-wide depthwise conv gathers the whole map into one value per channel as the paper's global
  extent does (create_conv2d's default padding of k // 2 would give a 7 x 7 output from an
  8 x 8 map). The forward pass is timm's."""
  module = GatherExcite(CHANNELS, use_mlp=False)
  if use_mlp:
    module.mlp = ConvMlp(CHANNELS, make_divisible(CHANNELS / 16, 1, round_limit=0.0))
  module.gather = torch.nn.Sequential()
  module.gather.add_module(
    'conv1',
    create_conv2d(CHANNELS, CHANNELS, kernel_size=SIZE, stride=1, padding=0, depthwise=True),
  )
  module.gather.add_module('norm1', torch.nn.BatchNorm2d(CHANNELS))
  return module


def resnet_stem(name):
  """A 'd' or 't' ResNet's stem as timm runs it: conv1 (three convs), bn1, act1, maxpool."""
  net = timm.create_model(name, pretrained=False)
  return torch.nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)


# (channels, side) of a case's input where it is not (CHANNELS, SIZE): images for the stems; an
# odd map for the shortcut, where the pool's ceil mode and uncounted padding show.
INPUTS = {'deep_stem': (3, 16), 'tiered_stem': (3, 16), 'avg_down': (CHANNELS, 7)}
CASES = {
  'se': lambda: SEModule(CHANNELS, rd_ratio=1 / 16),
  'eca': lambda: EcaModule(CHANNELS),
  'cbam': lambda: CbamModule(CHANNELS),
  'ge_minus': lambda: GatherExcite(CHANNELS, use_mlp=False),
  'ge': lambda: gather_excite(use_mlp=False),
  'ge_plus': lambda: gather_excite(use_mlp=True),
  'sk': lambda: SelectiveKernel(CHANNELS, CHANNELS, split_input=True),
  'sk_stride2': lambda: SelectiveKernel(CHANNELS, CHANNELS, stride=2, split_input=True),
  'split': lambda: SplitAttn(CHANNELS, CHANNELS, radix=2, norm_layer=torch.nn.BatchNorm2d),
  'split_stride2': lambda: SplitAttn(
    CHANNELS, CHANNELS, stride=2, radix=2, norm_layer=torch.nn.BatchNorm2d
  ),
  'condconv': lambda: RoutedCondConv(CHANNELS, 4),
  'global': lambda: BottleneckAttn(CHANNELS, CHANNELS, feat_size=(SIZE, SIZE), num_heads=4),
  'global_stride2': lambda: BottleneckAttn(
    CHANNELS, CHANNELS, feat_size=(SIZE, SIZE), stride=2, num_heads=4
  ),
  'deep_stem': lambda: resnet_stem('resnet50d'),
  'tiered_stem': lambda: resnet_stem('ecaresnet50t'),
  'avg_down': lambda: downsample_avg(
    CHANNELS, 2 * CHANNELS, 1, stride=2, norm_layer=torch.nn.BatchNorm2d
  ),
}

out_dir = sys.argv[1]
torch.manual_seed(0)
for name, build in CASES.items():
  module = build().eval()
  with torch.no_grad():
    for sub in module.modules():
      if isinstance(sub, torch.nn.BatchNorm2d):
        sub.weight.uniform_(0.5, 1.5)
        sub.bias.normal_(0.0, 0.2)
        sub.running_mean.normal_(0.0, 0.2)
        sub.running_var.uniform_(0.5, 2.0)
    if name == 'global' or name == 'global_stride2':  # Non-zero position tables.
      module.pos_embed.height_rel.normal_(0.0, 0.5)
      module.pos_embed.width_rel.normal_(0.0, 0.5)
    channels, side = INPUTS.get(name, (CHANNELS, SIZE))
    x = torch.randn(2, channels, side, side)
    y = module(x)
  state = {f'state/{k}': v.numpy() for k, v in module.state_dict().items()}
  np.savez(
    os.path.join(out_dir, f'{name}.npz'),
    x=x.permute(0, 2, 3, 1).numpy(),
    y=y.permute(0, 2, 3, 1).numpy(),
    **state,
  )
counts = {
  name: sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
  for name in NETWORKS
}
np.savez(os.path.join(out_dir, 'networks.npz'), **counts)
