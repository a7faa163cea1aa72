"""Data-parallel distillation across processes: a ZeRO-3-sharded teacher and replicated prompts.

Modules: :mod:`.launch` (launcher environment, process group, collectives), :mod:`.batchnorm`
(padding-aware synchronized batch norm), :mod:`.zero` (DeepSpeed config and the ZeRO-3 teacher).

    torchrun --nproc_per_node 2 -m clipdistill.engine.cli distill --config run.yaml deepspeed=ds_config.json
    deepspeed --no_local_rank --num_gpus 2 $(which clipdistill) distill --config run.yaml deepspeed=ds_config.json
    deepspeed --no_local_rank --hostfile hosts.txt $(which clipdistill) distill --config run.yaml deepspeed=...

(``--no_local_rank``: the deepspeed launcher would otherwise put ``--local_rank=N`` before the
sub-command; the rank comes from the environment, ``LOCAL_RANK``, either way.)

What runs where, with P processes (ranks) and a global batch of G samples (``data.batch_size``):

- **Launcher environment** (:func:`detect_launch`): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``, set by ``torchrun`` or the ``deepspeed`` launcher. When
  they are present the run joins a process group (:func:`init_process_group`: nccl on CUDA,
  gloo on the CPU) and the loader gives rank r its fixed slice of every global batch
  (G / P samples). Without them the run is the plain single-process one, unchanged.
- **Teacher** (``train.deepspeed``, :func:`build_sharded_teacher`): only the image tower runs
  while training, so only it is sharded. It is built under ``deepspeed.zero.Init`` (every
  parameter partitioned as it is created: no rank ever holds the whole tower), its weights are
  streamed in one parameter at a time under ``GatheredParameters(..., modifier_rank=0)`` from a
  state dict that rank 0 alone holds in host memory, and it is wrapped in a ZeRO-3 engine with
  no optimizer (DeepSpeed refuses an optimizer over an empty parameter list), kept in eval mode
  (train mode under no_grad takes a wrong path in DeepSpeed). ``offload_param`` (cpu, nvme)
  and the partitions' dtype (``bf16``/``fp16``; else from ``teacher.precision``,
  :func:`with_teacher_precision`) come from the DeepSpeed config. The whole open_clip ``CLIP`` cannot be built under
  zero.Init (its 0-dim ``logit_scale`` fails partitioning), another reason to shard the tower.
- **Tuned teacher** (``teacher.prompts`` with ``train.deepspeed``,
  :func:`build_sharded_tuned_teacher`): a PromptSRC teacher from ``clipdistill tune-teacher``
  is sharded the same way, as one module holding the image tower and the frozen tuned vision
  prompts (:class:`PromptedImageTower`, every parameter partitioned) whose forward is the
  prompt learners' own prompted image path. That path never calls the tower's ``forward``, so
  the tower's direct parameters (class embedding, positional embedding, projection) are
  registered as external parameters of the wrapper, gathered and released with its forward.
- **Class vectors**: computed once, on rank 0, with the teacher's text tower (and, for a tuned
  teacher, its learned text prompts; moved to rank 0's device for that, after the image
  tower's weights were taken out of the model, which stays in host memory) and broadcast to
  every rank; rank 0 alone writes the class-vector cache (a tuned teacher uses none).
- **Student** (ZeRO stage 0: its trainable tensors are tiny): replicated. Each rank's loss is
  scaled by its share of the global batch's real rows (:func:`row_share`) and the gradients are
  summed over ranks (:func:`sum_gradients`), so a step equals the single-process step on the
  same global batch, also when ranks hold unequal numbers of real rows (an epoch's last step,
  rejected images) and with gradient accumulation. PromptKD's projector batch norm takes its
  statistics over the real rows of every rank (:func:`sync_batch_norm`).
- **Held-out selection** (``data.holdout_fraction``): each rank scores its slice of every
  held-out batch and the tallies are summed, so all ranks take the same decision; rank 0
  writes ``best.safetensors``.
- **Teacher cache** (``teacher.cache``): no teacher is loaded, so there is nothing to shard;
  the ranks train data-parallel on the cached features.
- **Checkpoints**: clipdistill's own safetensors files, written by rank 0 only (the learner and
  optimizer are identical on every rank; the loader state is world-size independent), so a
  run resumes with the same or another number of ranks.
"""
