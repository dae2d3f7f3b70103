"""The stage table is the one place that knows the stages: config sections, linking and verbs follow it."""

import argparse

from raylm.core import cli, stages
from raylm.core.artifacts import RunDir
from raylm.core.config import PlatformConfig, build_config


def test_every_stage_has_a_section_a_verb_and_importable_functions():
    verbs = {v.name for v in cli.VERBS}
    for stage in stages.STAGES:
        assert stage.section in PlatformConfig.model_fields
        assert PlatformConfig.model_fields[stage.section].description == stage.help
        assert stage.name in verbs
        assert callable(stage.function("run")) and callable(stage.function("preflight"))
        assert all(read.upstream in stages.BY_NAME for read in stage.inputs)


def test_linking_follows_the_table(tmp_path):
    raw = {
        "name": "t",
        "run_dir": str(tmp_path),
        "data": {"sources": [{"path": str(tmp_path)}]},
        "train": {"model": {"from_scratch": {}}},
        "serve": {},
    }
    cfg = build_config(raw)
    run = RunDir(str(tmp_path))
    assert cfg.data.output == run.curated.root
    assert (cfg.train.data_dir, cfg.train.output) == (run.curated.root, run.train.root)
    assert cfg.serve.model == run.train.export.root
    # An explicit upstream output is what the next stage reads.
    raw["data"]["output"] = str(tmp_path / "elsewhere")
    assert build_config(raw).train.data_dir == str(tmp_path / "elsewhere")


def test_a_verb_with_its_own_arguments_plugs_into_the_cli(monkeypatch, capsys):
    """What the cluster issue's `raylm cluster check FILE` needs: a row with arguments other than a recipe."""

    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("file")

    def main(args: argparse.Namespace) -> int:
        print(f"checked {args.file}")
        return 3

    verb = cli.Verb("inspect", "inspect a file", arguments, main)
    monkeypatch.setattr(cli, "VERBS", (*cli.VERBS, verb))
    assert cli.main(["inspect", "cluster.yaml"]) == 3
    assert capsys.readouterr().out == "checked cluster.yaml\n"


def test_a_new_stage_row_is_enough_for_config_and_cli(monkeypatch):
    """Adding a stage = a row in the table (plus the stage's own folder): the recipe section, `stages:`
    and the verb all follow without editing core/config.py or core/cli.py."""
    import importlib

    from raylm.core import config as config_module
    from raylm.core.schema import Section

    class ProbeConfig(Section):
        output: str | None = None
        """Where the probe writes."""
        data_dir: str | None = None
        """What it reads."""

    row = stages.Stage(
        name="probe",
        section="probe",
        config=ProbeConfig,
        run="raylm.core.cli:main",
        help="a stage added for this test",
        output_field="output",
        default_output=lambda run: f"{run.root}/probe",
        inputs=(stages.Input("data_dir", "curate"),),
    )
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, row))
    monkeypatch.setattr(stages, "BY_NAME", {**stages.BY_NAME, "probe": row})
    reloaded = importlib.reload(config_module)
    try:
        cfg = reloaded.build_config({"name": "t", "run_dir": "/r", "stages": ["probe"], "probe": {}})
        assert (cfg.probe.output, cfg.probe.data_dir) == ("/r/probe", "/r/curated")
    finally:
        monkeypatch.undo()
        importlib.reload(config_module)
