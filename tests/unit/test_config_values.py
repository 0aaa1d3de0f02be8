"""Every out-of-range training or sampling value is refused in one line naming the key and the
valid range, before any work; a run resumed at or past train.stop_at_step trains nothing."""

from __future__ import annotations

import warnings

import pytest
from hydra import compose, initialize_config_dir

from pretrain.config import ConfigError, validate
from pretrain.pretrained import SourceError
from pretrain.sample import SampleConfig, check
from tests.conftest import REPO


def config(*overrides: str):  # noqa: ANN201 - a DictConfig
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=["experiment=debug", *overrides])


@pytest.mark.parametrize(
    "override, says",
    [
        ("optim.lr=-0.001", "optim.lr=-0.001 must be at least 0"),
        ("optim.beta2=1.5", "optim.beta2=1.5 must be in [0.0, 1.0)"),
        ("optim.beta1=-0.1", "optim.beta1=-0.1 must be in [0.0, 1.0)"),
        ("optim.eps=0", "optim.eps=0.0 must be positive"),
        ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be 0 (off) or positive"),
        ("data.num_workers=-1", "data.num_workers=-1 must be at least 0"),
        ("data.partitions=0", "data.partitions=0 must be at least 1"),
        ("train.global_batch_tokens=-100", "train.global_batch_tokens=-100 must be 0"),
        ("schedule.warmup_steps=-10", "schedule.warmup_steps=-10 must be 0"),
        ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio=1.5 must be in [0.0, 1.0]"),
        ("train.eval_batches=-1", "train.eval_batches=-1 must be 0"),
        ("train.stop_at_step=-3", "train.stop_at_step=-3 must be 0"),
        ("checkpoint.keep_last=-2", "checkpoint.keep_last=-2 must be 0"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_range(override: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(config(override))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_zero_learning_rate_is_allowed_with_a_warning() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        validate(config("optim.lr=0"))
    assert any("optim.lr=0" in str(w.message) for w in seen)


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("max_new_tokens", -3, "max_new_tokens=-3: must be at least 1"),
        ("temperature", -1.0, "temperature=-1.0: must be >= 0"),
        ("num_samples", 0, "num_samples=0: must be at least 1"),
        ("top_p", 0.0, "top_p=0.0: must be in (0, 1]"),
    ],
)
def test_sampling_values_are_refused_before_loading(field: str, value: float, says: str) -> None:
    cfg = SampleConfig(checkpoint="/does/not/matter", **{field: value})  # type: ignore[arg-type]
    with pytest.raises(SourceError, match=says.replace("(", r"\(").replace("[", r"\[")):
        check(cfg)
