"""A run's image list (issue 18, item 4): a resumed run keeps the list it started with (its checkpoints
hold the list's digest), and says that the folder changed since."""
from __future__ import annotations

import logging
import shutil

from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.trainer import Trainer


def test_a_resumed_run_keeps_its_list_and_says_the_folder_changed(shape_data, tiny_run_config, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(shape_data, data)
    first = build_run(load_run_config(tiny_run_config(data, tmp_path / "run", train={"max_steps": 2,
                                                                                     "checkpoint_every": 2})),
                      log=lambda m: None)
    Trainer(first, log=lambda m: None).fit()
    started_with = first.loader.samples
    images = data / "images"
    shutil.copy(images / started_with.paths[0], images / "zz_added_later.jpg")

    resumed_cfg = load_run_config(tiny_run_config(data, tmp_path / "run", train={"max_steps": 3, "resume": True}))
    with caplog.at_level(logging.WARNING, logger="clipdistill.loaders"):
        resumed = build_run(resumed_cfg, log=lambda m: None)
    assert resumed.loader.samples.paths == started_with.paths
    assert "changed since this run's list was saved" in caplog.text and "keeps its list" in caplog.text
    trainer = Trainer(resumed, log=lambda m: None)
    trainer.fit()  # the loader's state (the list's digest) matches: no "sample list changed"
    assert trainer.global_step == 3
    # (a new run, like `index`, sees the change: tests/loaders/test_hostile_sources.py)
