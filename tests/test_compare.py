"""Compare: ``arch.`` options put variants on another architecture (pretrained on the same source task)."""

from __future__ import annotations

import pytest

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import (
    CompareConfig,
    compare,
    plan_runs,
    split_arch_options,
    variant_name,
)


def test_split_arch_options() -> None:
    assert split_arch_options({"lr_mult": 2, "arch.depth": 38}) == ({"lr_mult": 2}, {"depth": 38})
    assert split_arch_options({}) == ({}, {})
    with pytest.raises(UserError, match="arch.depth=38"):
        split_arch_options({"arch.": 3})


def test_variant_name_is_what_runs_are_recorded_under() -> None:
    assert variant_name("finetune[stochastic=true]") == "finetune[stochastic=True]"
    assert variant_name("spottune[tau=5.0]") == "spottune"  # a default is dropped
    assert variant_name("finetune[arch.depth=38]") == "finetune[arch.depth=38]"
    assert variant_name("finetune[last_k=2,arch.width=8]") == "finetune[last_k=2,arch.width=8]"


def test_plan_names_the_arch_variant_and_asks_for_its_source(tiny_source: pt.LayeredNet) -> None:
    asked: list[dict] = []
    other = pt.build_model("lenet", num_classes=5, seed=1, width=4, hidden=8)

    def source_for(kwargs: dict) -> pt.LayeredNet:
        asked.append(kwargs)
        return other

    config = CompareConfig(
        methods=["finetune", "finetune[last_k=2,arch.hidden=8]", "scratch[arch.hidden=8]"], seeds=[0]
    )
    plan = plan_runs(config, tiny_source, source_for)
    assert [p.variant for p in plan[::3]] == [
        "finetune",
        "finetune[last_k=2,arch.hidden=8]",
        "scratch[arch.hidden=8]",
    ]
    assert [p.arch_kwargs for p in plan[::3]] == [{}, {"hidden": 8}, {"hidden": 8}]
    assert plan[3].options == {"last_k": 2}  # the method itself never sees arch. options
    assert asked == [{"hidden": 8}]  # scratch needs no source


def _small(methods: list[str], source: str = "fashion[0-4]") -> CompareConfig:
    return CompareConfig(
        arch="lenet",
        source=source,
        target="fashion[5-9]",
        shots=2,
        methods=methods,
        lrs=[0.01],
        seeds=[0],
        epochs=1,
        source_epochs=1,
        source_limit=40,
        data={"val_shots": 2, "test_limit": 20},
    )


def test_arch_variant_trains_on_its_own_source(tmp_path) -> None:
    out = compare(
        _small(["finetune", "finetune[arch.hidden=8]", "scratch[arch.hidden=8]"]), tmp_path, progress=False
    )
    runs = {r["method"]: r for r in out["runs"]}
    assert set(runs) == {"finetune", "finetune[arch.hidden=8]", "scratch[arch.hidden=8]"}
    small = sum(p.numel() for p in pt.build_model("lenet", 5, hidden=8).parameters())
    default = sum(p.numel() for p in pt.build_model("lenet", 5).parameters())
    assert runs["finetune"]["diagnostics"]["trainable_params"] == default
    assert runs["finetune[arch.hidden=8]"]["diagnostics"]["trainable_params"] == small
    assert runs["scratch[arch.hidden=8]"]["diagnostics"]["trainable_params"] == small
    assert runs["finetune[arch.hidden=8]"]["config"]["arch_kwargs"] == {"hidden": 8}
    assert set(out["selected"]) == set(runs)
    # re-running reuses every finished run, including the arch variant's
    again = compare(_small(["finetune[arch.hidden=8]"]), tmp_path, progress=False)
    assert again["runs"][0]["fingerprint"] == runs["finetune[arch.hidden=8]"]["fingerprint"]
    assert again["runs"][0]["wall_time_s"] == runs["finetune[arch.hidden=8]"]["wall_time_s"]


def test_arch_options_need_a_source_task_not_a_saved_model(tmp_path, tiny_source) -> None:
    saved = pt.save_model(tiny_source, tmp_path / "lenet_src")
    with pytest.raises(UserError, match="task spec"):
        compare(_small(["finetune[arch.hidden=8]"], source=str(saved)), tmp_path / "out", progress=False)


def test_unknown_arch_option_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(UserError, match="bad option for arch 'lenet'"):
        compare(_small(["scratch[arch.depth=38]"]), tmp_path, progress=False)
