"""The workflow engine (components/workflow.py) on small real stages that write files: what runs, what is
skipped, and what a change, a failure or a deleted output re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from components.workflow import (
    DONE,
    FAILED,
    Stage,
    StateFile,
    WorkflowError,
    run_stages,
)


class Chain:
    """source -> double -> report: each stage writes a file under its output directory and counts its runs."""

    def __init__(self, root: Path):
        self.root, self.runs, self.settings, self.fail = root, [], {"n": 3, "scale": 2, "title": "t"}, set()

    def stages(self) -> list[Stage]:
        def source(up, out):
            return OmegaConf.create({"n": self.settings["n"], "out": out, "progress": False})

        def double(up, out):
            return OmegaConf.create({"scale": self.settings["scale"], "input": up["source"]["file"], "out": out})

        def report(up, out):
            return OmegaConf.create({"title": self.settings["title"], "input": up["double"]["file"], "out": out})

        def run(name, compute):
            def stage_run(cfg):
                self.runs.append(name)
                if name in self.fail:
                    raise RuntimeError(f"{name} broke")
                Path(cfg.out).mkdir(parents=True, exist_ok=True)
                target = Path(cfg.out) / f"{name}.json"
                target.write_text(json.dumps(compute(cfg)))
                return {"file": str(target)}
            return stage_run

        def read(cfg):
            return json.loads(Path(cfg.input).read_text())

        def exists(outputs):
            return Path(outputs["file"]).is_file()

        return [
            Stage("source", (), source, run("source", lambda c: list(range(c.n))), exists),
            Stage("double", ("source",), double, run("double", lambda c: [c.scale * x for x in read(c)]), exists),
            Stage("report", ("double",), report, run("report", lambda c: {c.title: sum(read(c))}), exists),
        ]

    def run(self, selected=("source", "double", "report"), **kwargs):
        self.runs = []
        state = StateFile(self.root / "state.json")
        return run_stages(self.stages(), list(selected), state, self.root, say=lambda _: None, **kwargs), state


def test_second_run_skips_everything_and_a_change_reruns_from_there(tmp_path):
    chain = Chain(tmp_path)
    reports, state = chain.run()
    assert chain.runs == ["source", "double", "report"]
    assert json.loads(Path(reports[-1].outputs["file"]).read_text()) == {"t": 6}
    assert {r["status"] for r in state.records.values()} == {DONE}

    reports, _ = chain.run()
    assert chain.runs == [] and [r.action for r in reports] == ["skipped"] * 3

    chain.settings["title"] = "u"  # only the last stage's config
    chain.run()
    assert chain.runs == ["report"]

    chain.settings["n"] = 4  # the first stage: every stage downstream re-runs
    reports, _ = chain.run()
    assert chain.runs == ["source", "double", "report"]
    assert json.loads(Path(reports[-1].outputs["file"]).read_text()) == {"u": 12}


def test_volatile_settings_do_not_count(tmp_path):
    chain = Chain(tmp_path)
    chain.run()
    original = chain.stages

    def with_progress_on():
        stages = original()
        source = stages[0]
        stages[0] = Stage("source", (), lambda up, out: OmegaConf.merge(source.config(up, out), {"progress": True}),
                          source.run, source.still_valid)
        return stages

    chain.stages = with_progress_on
    chain.run()
    assert chain.runs == []


def test_failed_stage_is_rerun_and_finished_ones_are_kept(tmp_path):
    chain = Chain(tmp_path)
    chain.fail = {"double"}
    with pytest.raises(RuntimeError, match="double broke"):
        chain.run()
    assert chain.runs == ["source", "double"]
    state = StateFile(tmp_path / "state.json")
    assert state.get("source")["status"] == DONE and state.get("double")["status"] == FAILED
    assert "double broke" in state.get("double")["error"] and state.get("report") is None

    chain.fail = set()
    chain.run()
    assert chain.runs == ["double", "report"]


def test_deleted_outputs_and_force_rerun(tmp_path):
    chain = Chain(tmp_path)
    reports, _ = chain.run()
    Path(reports[1].outputs["file"]).unlink()
    chain.run()
    assert chain.runs == ["double", "report"]  # double's output is gone; report follows the re-run
    chain.run(force=["source"])
    assert chain.runs == ["source", "double", "report"]


def test_subset_uses_earlier_outputs_and_refuses_missing_ones(tmp_path):
    chain = Chain(tmp_path)
    with pytest.raises(WorkflowError, match="needs the outputs of source.*add source"):
        chain.run(selected=["double"])
    chain.run(selected=["source"])
    assert chain.runs == ["source"]
    chain.run(selected=["double", "report"])
    assert chain.runs == ["double", "report"]
    with pytest.raises(WorkflowError, match="unknown stage"):
        chain.run(selected=["sauce"])


def test_output_directory_is_named_by_the_key(tmp_path):
    chain = Chain(tmp_path)
    reports, state = chain.run()
    for report in reports:
        assert Path(report.outputs["file"]).parent.name == state.get(report.name)["key"]


def test_ingest_writes_into_its_keyed_folder_and_an_edited_url_list_changes_its_key(tmp_path):
    """pipelines/end_to_end.py's ingest stage: shards go to the stage's folder named by its key unless the data
    names one itself (a changed setting never meets an earlier run's shards), and the key follows the URL list's
    content, not only its path."""
    from components.stages.wiring import stage_config
    from components.workflow import cache_key
    from pipelines import end_to_end
    from tests.helpers import listed

    urls = tmp_path / "pairs.csv"
    urls.write_text("url,caption\nhttps://images.example/a.png,a red apple\n")

    def ingest(*data: str) -> tuple[Stage, str, str]:
        cfg = stage_config("end_to_end", ["corpus=url_list",
                                                     f"data_overrides={listed([f'data.url_list={urls}', *data])}"])
        (stage,) = [s for s in end_to_end.build_stages(cfg) if s.name == "ingest"]
        out = str(tmp_path / "work" / "ingest" / "KEY")
        return stage, cache_key(stage, stage.config({}, out), {}), stage.config({}, out).data.output_dir

    stage, key, output_dir = ingest()
    assert output_dir == str(tmp_path / "work" / "ingest" / "KEY")
    assert ingest(f"data.output_dir={tmp_path / 'mine'}")[2] == str(tmp_path / "mine")
    assert ingest()[1] == key  # the same list, the same key
    urls.write_text("url,caption\nhttps://images.example/a.png,a green apple\n")
    assert ingest()[1] != key


def test_shards_made_elsewhere_are_the_ingest_stages_output_as_they_are(tmp_path):
    """corpus=webdataset: the ingest stage ingests nothing and hands the shards on where they lie; they stay valid
    until a tar changes."""
    import os

    import webdataset

    from components.stages.wiring import stage_config
    from pipelines import end_to_end
    from tests.helpers import listed

    shards = tmp_path / "laion"
    shards.mkdir()
    with webdataset.TarWriter(str(shards / "00000.tar"), encoder=False) as writer:
        writer.write({"__key__": "000000000", "jpg": b"\xff\xd8", "txt": b"a red apple"})
    cfg = stage_config("end_to_end", ["corpus=webdataset",
                                                 f"data_overrides={listed([f'data.shards={shards}'])}"])
    (stage,) = [s for s in end_to_end.build_stages(cfg) if s.name == "ingest"]
    config = stage.config({}, str(tmp_path / "work" / "ingest" / "KEY"))
    assert config.data.output_dir == str(shards)
    outputs = stage.run(config)
    assert outputs["shards"] == str(shards) and stage.still_valid(outputs)
    assert sorted(p.name for p in shards.iterdir()) == ["00000.tar"]  # nothing written beside them
    stamp = (shards / "00000.tar").stat()
    os.utime(shards / "00000.tar", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    assert not stage.still_valid(outputs)
