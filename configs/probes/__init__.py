"""Small CPU configs of the six families compared by scripts/probe_suite.py (issue 14), sized to about equal
parameter counts (d_model 64, 4 heads of 16, vocabulary 32, ~106k-112k parameters; see each file).

One file per family, each with ``get_config()`` like every config in configs/; ``common.py`` holds what they share
(data, optimiser, training). The data part is a placeholder: the script sets data.name, seq_len and the probe's
fields for every probe. Load them with ``looped_jax.config.load_config("configs/probes/<family>.py")``.
"""
