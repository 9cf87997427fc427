"""The traced-for platform: default backend outside use_platform, the named one inside, restored after."""

import jax
import pytest

from looped_jax.nn.platform import target_platform, use_platform


def test_default_is_the_backend_and_context_nests_and_restores():
    assert target_platform() == jax.default_backend()
    with use_platform("tpu"):
        assert target_platform() == "tpu"
        with use_platform("gpu"):  # jax.default_backend()'s name for an NVIDIA device
            assert target_platform() == "cuda"
        assert target_platform() == "tpu"
    assert target_platform() == jax.default_backend()


def test_unknown_platform_is_named():
    with pytest.raises(ValueError, match="'tpux'"):
        with use_platform("tpux"):
            pass
    assert target_platform() == jax.default_backend()
