"""The old path ``clipdistill.engine.recipes``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.config.run`` instead.
The module was: The run configuration's schema, the shipped recipes and the one builder of a run's parts.
"""
from clipdistill.engine.config.run import (LEARNER_KINDS, RECIPES, DataConfig, LearnerConfig, LossConfig, ModelConfig,
                                           OptimConfig, RunConfig, TeacherConfig, TrainConfig, config_differences,
                                           dump_run_config, learner_class, learner_options, load_run_config,
                                           recipe_path)

__all__ = ["DataConfig", "LEARNER_KINDS", "LearnerConfig", "LossConfig", "ModelConfig", "OptimConfig", "RECIPES",
           "RunConfig", "TeacherConfig", "TrainConfig", "config_differences", "dump_run_config",
           "learner_class", "learner_options", "load_run_config", "recipe_path"]
