"""The old path ``clipdistill.engine.distributed``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.parallel.batchnorm``, ``clipdistill.engine.parallel.launch``, ``clipdistill.engine.parallel.zero`` instead.
The module was: Data-parallel distillation across processes: a ZeRO-3-sharded teacher and replicated prompts.
"""
from clipdistill.engine.parallel.batchnorm import sync_batch_norm
from clipdistill.engine.parallel.launch import (LAUNCH_VARIABLES, OFFLOAD_DEVICES, LaunchEnv, all_reduce_sum,
                                                broadcast_from_rank0, check_world, detect_launch, init_process_group,
                                                is_initialized, rank_and_world, rank_device, row_share, sum_gradients)
from clipdistill.engine.parallel.zero import (PromptedImageTower, ShardedTeacher, build_sharded_teacher,
                                              build_sharded_tuned_teacher, build_vision_tower, load_deepspeed_config,
                                              require_deepspeed, with_teacher_precision)

__all__ = ["LAUNCH_VARIABLES", "LaunchEnv", "OFFLOAD_DEVICES", "PromptedImageTower", "ShardedTeacher",
           "all_reduce_sum", "broadcast_from_rank0", "build_sharded_teacher",
           "build_sharded_tuned_teacher", "build_vision_tower", "check_world", "detect_launch",
           "init_process_group", "is_initialized", "load_deepspeed_config", "rank_and_world",
           "rank_device", "require_deepspeed", "row_share", "sum_gradients", "sync_batch_norm",
           "with_teacher_precision"]
