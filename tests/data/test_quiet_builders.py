"""Making a builder from a looped_jax DataConfig does not log TFDS's "Using custom data configuration"."""

import logging

from looped_jax.data import DataConfig, get_builder


def test_builders_do_not_warn_about_custom_configs(tmp_path, caplog):
    cfg = DataConfig(name="chains", data_dir=str(tmp_path), seq_len=40, num_train=16, num_test=4, test_hops=(2,))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            get_builder(cfg)
        logging.getLogger("absl").warning("another absl warning")  # the filter drops only that one message
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "custom data configuration" in m], messages
    assert "another absl warning" in messages
