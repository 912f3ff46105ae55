"""Compare: ``arch.`` options put variants on another architecture (pretrained on the same source task)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import paramtransfer as pt
from paramtransfer.errors import UserError
from paramtransfer.experiments.compare import (
    CompareConfig,
    check_out_dir,
    compare,
    plan_runs,
    read_result,
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


# ---- settings that are bad input, and output folders of another comparison ---------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seeds": [0, 1, 0]}, "seed 0 is given more than once"),
        ({"seeds": []}, "at least one seed"),
        ({"lrs": [0.1, 0.01, 0.1]}, "learning rate 0.1 is given more than once"),
        ({"lrs": []}, "at least one learning rate"),
        ({"lrs": [float("nan")]}, "positive numbers"),
        ({"data": {"test_limit": -5}}, "test_limit=-5"),
        ({"data": {"test_limit": 0}}, "test_limit=0"),
        ({"data": {"val_shots": 2.5}}, "val_shots=2.5"),
        ({"data": {"test_limt": 5}}, "test_limt"),
    ],
)
def test_compare_config_rejects_bad_settings(kwargs: dict, needle: str) -> None:
    with pytest.raises(UserError, match=re.escape(needle)):
        CompareConfig(**kwargs)


def _result(target: str = "fashion[5-9]", shots: int = 2, method: str = "scratch") -> dict:
    return {
        "method": method,
        "source": None,
        "target": target,
        "arch": "lenet",
        "seed": 0,
        "config": {
            "lr": 0.01,
            "epochs": 1,
            "shots": shots,
            "train": {"epochs": 1, "lr": 0.01, "batch_size": 32},
            "data": {"val_shots": 2, "limit": None, "test_limit": 20},
        },
        "val_accuracy": 0.5,
        "test_accuracy": 0.5,
    }


def _put(root: Path, content: object, variant: str = "scratch") -> Path:
    path = root / "runs" / variant / "lr=0.01" / "seed=0" / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_out_dir_of_another_comparison_or_with_a_damaged_run_is_refused(tmp_path: Path) -> None:
    config = _small(["scratch", "finetune"])
    _put(tmp_path / "same", _result())
    check_out_dir(config, tmp_path / "same")  # the same settings: its runs are reused
    check_out_dir(CompareConfig(**{**config.__dict__, "seeds": [0, 1, 2]}), tmp_path / "same")  # extended
    _put(tmp_path / "other", _result(shots=5))
    with pytest.raises(UserError, match=r"another comparison \(runs/scratch/.*shots 5 there, 2 here\)"):
        check_out_dir(config, tmp_path / "other")
    _put(tmp_path / "other_target", _result(target="digits"))
    with pytest.raises(UserError, match="target digits there, fashion"):
        check_out_dir(config, tmp_path / "other_target")
    for i, broken in enumerate(['{"method": "scr', "[1, 2]", json.dumps({"method": "scratch"})]):
        bad = _put(tmp_path / f"broken{i}", broken)
        with pytest.raises(
            UserError, match=re.escape(f"{bad} is not a") + ".*delete it and re-run the command"
        ):
            check_out_dir(config, tmp_path / f"broken{i}")


def test_compare_runs_a_damaged_run_again_with_a_warning(tmp_path: Path, capsys) -> None:
    path = _put(tmp_path, "[1, 2]")  # valid JSON of another shape: crashed the reuse check before
    out = compare(_small(["scratch"]), tmp_path, progress=False)
    assert "1 finished run(s)" in capsys.readouterr().err
    assert read_result(path).method == "scratch" and out["runs"][0]["status"] == "ok"
