"""Every registered classification model: full-size output shapes and parameter counts (abstractly)."""

import jax
import jax.numpy as jnp
import pytest
import torch

from cvjax.models import MODELS, create_model

# Parameter counts of the torchvision ImageNet models (``weights.meta['num_params']`` in torchvision's model
# docs; test_table_is_torchvisions_count checks them against torchvision's models where it imports, so the
# shape test below needs no torchvision); a layer in the wrong place, a missing bias or a wrong width changes
# them. Plain nets: the ResNet count minus the projection shortcuts (1x1 conv + BN at 128, 256, 512 channels).
TORCHVISION_NUM_PARAMS = {
    "alexnet": 61_100_840, "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "vgg11": 132_863_336, "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848, "vgg13_bn": 133_053_736, "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
}
_PROJECTIONS = sum(c_in * c_out + 2 * c_out for c_in, c_out in ((64, 128), (128, 256), (256, 512)))
TORCHVISION_NUM_PARAMS["plain18"] = TORCHVISION_NUM_PARAMS["resnet18"] - _PROJECTIONS
TORCHVISION_NUM_PARAMS["plain34"] = TORCHVISION_NUM_PARAMS["resnet34"] - _PROJECTIONS


def test_all_classifiers_are_registered():
  assert set(MODELS.names()) >= set(TORCHVISION_NUM_PARAMS)


@pytest.mark.parametrize("name", sorted(TORCHVISION_NUM_PARAMS))
def test_full_size_logits_shape_and_parameter_count(name):
  model = create_model(name)

  def init_and_apply(x):
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    return model.apply(variables, x, train=False), variables

  logits, variables = jax.eval_shape(init_and_apply, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"])) == \
      TORCHVISION_NUM_PARAMS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION_NUM_PARAMS))
def test_table_is_torchvisions_count(torchvision, name):
  residual_name = name.replace("plain", "resnet")
  with torch.device("meta"):  # shapes only: no memory, no init (vgg19 would be 0.6 GB and seconds)
    model = getattr(torchvision.models, residual_name)()
  count = sum(p.numel() for p in model.parameters())
  if name == residual_name:
    assert torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] == count  # what the docs list
  else:  # torchvision has no plain nets: drop the projection shortcuts
    count -= sum(p.numel() for n, p in model.named_parameters() if ".downsample." in n)
  assert TORCHVISION_NUM_PARAMS[name] == count


def test_unknown_name_lists_valid_names():
  with pytest.raises(KeyError, match="resnet18"):
    create_model("resnet17")
