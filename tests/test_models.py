from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dtp_search.models import build_model
from dtp_search.pruning import attach_masks, prunable_layers
from dtp_search.search.config import register_resolvers

register_resolvers()

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_every_model_config_builds_and_runs_masked(name, shape):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if name == "custom":  # the user's own network (tests/user_nets.py)
        cfg._target_ = "user_nets.PatchAttention"
        cfg.in_channels = shape[0]
        assert cfg.name == "PatchAttention"
    model = build_model(cfg, shape, 10)
    attach_masks(model)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert len(list(prunable_layers(model))) >= 3


def test_resnet20_has_the_papers_parameter_count():
    model = build_model(OmegaConf.load(CONF / "resnet20.yaml"), (3, 32, 32), 10)
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6


def test_small_inputs_get_a_clear_error_or_padding():
    cfg = OmegaConf.load(CONF / "simple_cnn.yaml")
    with pytest.raises(ValueError, match=r"model\.padding"):
        build_model(cfg, (1, 8, 8), 10)
    cfg.padding = [2, 2]
    assert build_model(cfg, (1, 8, 8), 10)(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_the_built_in_networks_are_the_settings_archs_but_custom():
    # models.MODELS names the classes here; settings.MODEL_ARCHS is what model.arch allows.
    from dtp_search.models import MODELS
    from dtp_search.settings import MODEL_ARCHS

    assert (*MODELS, "custom") == MODEL_ARCHS
