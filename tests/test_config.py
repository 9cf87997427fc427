import dataclasses

import pytest

from looped_jax.config import (
    ExperimentConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    diff_configs,
    parse_cli_overrides,
    parse_override_groups,
    parse_overrides,
    to_dict,
)


@dataclasses.dataclass(frozen=True)
class _Model:
    name: str = "toy"
    width: int = 4
    rate: float = 0.5
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"config field model.width must be >= 1, got {self.width}")


def _cfg():
    return ExperimentConfig(model=_Model(), data=_Model(name="data"))


def test_overrides_parse_by_type():
    cfg = apply_overrides(
        _cfg(),
        {"model.width": "8", "model.rate": "1e-3", "model.flag": "true", "model.sizes": "3,4,5", "train.seed": "7"},
    )
    assert cfg.model.width == 8 and cfg.model.rate == 1e-3 and cfg.model.flag is True
    assert cfg.model.sizes == (3, 4, 5) and cfg.train.seed == 7


def test_unknown_field_is_named_with_suggestion():
    with pytest.raises(ValueError, match=r"model.widht.*did you mean 'width'"):
        apply_overrides(_cfg(), {"model.widht": "3"})


def test_ill_typed_value_is_named():
    with pytest.raises(ValueError, match=r"model.width.*expects int.*'abc'"):
        apply_overrides(_cfg(), {"model.width": "abc"})
    with pytest.raises(ValueError, match="model.flag"):
        apply_overrides(_cfg(), {"model.flag": "maybe"})


def test_validation_reruns_after_override():
    with pytest.raises(ValueError, match="model.width must be >= 1"):
        apply_overrides(_cfg(), {"model.width": "0"})
    with pytest.raises(ValueError, match="optim.learning_rate"):
        OptimConfig(learning_rate=-1.0)
    with pytest.raises(ValueError, match="mesh"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="train.num_steps"):
        TrainConfig(num_steps=0)
    with pytest.raises(ValueError, match="train.max_minutes"):
        TrainConfig(max_minutes=-1.0)
    assert apply_overrides(_cfg(), {"train.max_minutes": "0.5"}).train.max_minutes == 0.5


def test_family_name_cannot_be_overridden():
    with pytest.raises(ValueError, match="model.name"):
        apply_overrides(_cfg(), {"model.name": "other"})


def test_cli_parsing_and_diff():
    path, ov = parse_cli_overrides(["--config", "c.py", "--config.model.width=3", "--config.train.seed", "2"])
    assert path == "c.py" and ov == {"model.width": "3", "train.seed": "2"}
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_cli_overrides(["--learning_rate=3"])
    a = to_dict(_cfg())
    b = to_dict(apply_overrides(_cfg(), {"model.width": "5"}))
    assert diff_configs(a, b) == ["model.width: checkpoint has 4, config has 5"]


def test_script_override_parsing():
    """Every script hands the arguments argparse did not know to parse_overrides."""
    assert parse_overrides(["--config.model.width=3", "--config.train.seed", "2", "--config.data.x=a=b"]) == {
        "model.width": "3",
        "train.seed": "2",
        "data.x": "a=b",
    }
    assert parse_overrides([]) == {}
    with pytest.raises(ValueError, match=r"unexpected argument '--set'.*--config.section.field=value"):
        parse_overrides(["--set", "model.width=3"])
    with pytest.raises(ValueError, match=r"unexpected argument 'model.width=3'"):
        parse_overrides(["model.width=3"])
    with pytest.raises(ValueError, match=r"--config.model.width has no value"):
        parse_overrides(["--config.model.width"])
    with pytest.raises(ValueError, match=r"--config.model.width has no value"):
        parse_overrides(["--config.model.width", "--config.train.seed=1"])
    with pytest.raises(ValueError, match="given twice"):
        parse_overrides(["--config.model.width=3", "--config.model.width=4"])
    with pytest.raises(ValueError, match="must name a field"):
        parse_overrides(["--config..width=3"])
    groups = parse_override_groups(
        ["--config.model.width=3", "--ar_config.model.width=5", "--ar_config.train.seed=1"], ("config", "ar_config")
    )
    assert groups == {"config": {"model.width": "3"}, "ar_config": {"model.width": "5", "train.seed": "1"}}
    with pytest.raises(ValueError, match=r"--config.section.field=value or --ar_config.section.field=value"):
        parse_override_groups(["--ltm.model.width=3"], ("config", "ar_config"))


def test_fields_validated_together_can_be_overridden_together():
    from looped_jax.nn import BlockConfig

    @dataclasses.dataclass(frozen=True)
    class Holder:
        block: BlockConfig = BlockConfig(num_heads=4, num_kv_heads=4)

    out = apply_overrides(Holder(), {"block.num_heads": "2", "block.num_kv_heads": "2"})
    assert out.block.num_heads == 2 and out.block.num_kv_heads == 2


def test_every_published_config_states_its_measured_plan():
    """A config planned for a TPU slice (TARGET_TOPOLOGY) says in its docstring how it fits there: the mesh, the
    remat policy and the per-chip memory of its AOT compile, and the command that measures them."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    planned = []
    for path in sorted(root.glob("*.py")):
        module = ast.parse(path.read_text())
        targets = [
            n.value.value
            for n in module.body
            if isinstance(n, ast.Assign)
            and any(getattr(t, "id", None) == "TARGET_TOPOLOGY" for t in n.targets)
            and isinstance(n.value, ast.Constant)
        ]
        if not targets:
            continue
        planned.append(path.stem)
        doc = " ".join((ast.get_docstring(module) or "").split())
        want = rf"Measured plan \({re.escape(targets[0])}, \d+ chips, .*--only {path.stem}`\): mesh .+, remat \S+, "
        assert re.search(want, doc), f"{path.name}: docstring lacks its measured plan for {targets[0]}"
        assert re.search(r"peak is [\d.]+ GiB of [\d.]+ \(arguments [\d.]+, outputs [\d.]+, temporaries [\d.]+", doc)
    assert len(planned) >= 15
