"""Model zoo: the networks a search prunes. Input channels, image size and class count
come from the dataset.

* :mod:`~dtp_search.models.zoo` — the built-in networks (``mlp``/``lenet300``, ``lenet5``,
  ``simple_cnn``, ``vgg``, ``resnet20``);
* :mod:`~dtp_search.models.user` — ``custom``, the user's own network named by
  ``model._target_``;
* :mod:`~dtp_search.models.weights` — trained weights to start from (``model.checkpoint``);
* :mod:`~dtp_search.models.build` — :func:`build_model` and :func:`start_model`, which pick
  and build one of them, from trained weights when ``model.checkpoint`` is set.
"""

from dtp_search.models.build import build_model, start_model
from dtp_search.models.user import build_custom, check_output
from dtp_search.models.weights import apply_checkpoint, checkpoint_digest, load_checkpoint
from dtp_search.models.zoo import MLP, MODELS, VGG, BasicBlock, LeNetStyle, ResNetCifar

__all__ = [
    "MLP",
    "MODELS",
    "VGG",
    "BasicBlock",
    "LeNetStyle",
    "ResNetCifar",
    "apply_checkpoint",
    "build_custom",
    "build_model",
    "check_output",
    "checkpoint_digest",
    "load_checkpoint",
    "start_model",
]
