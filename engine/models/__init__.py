"""Models: open_clip teachers and students, their towers, class vectors and the tuned teacher.

- :mod:`.clip`: loading open_clip models (names, local weights, precision), the frozen
  :class:`Teacher`, tokenizers; the tiny shipped configs.
- :mod:`.towers`: re-driving open_clip's own transformer blocks with prompt tokens.
- :mod:`.class_vectors`: text features of class names, cached as safetensors with a JSON key.
- :mod:`.tuned`: PromptKD's prompt-tuned teacher file and its loader.

The names below are the old ``clipdistill.engine.models`` module's, re-exported.
"""
from clipdistill.engine.models.clip import (CHECKPOINT_SUFFIXES, CONFIG_DIR, TINY_STUDENT, TINY_TEACHER, Teacher,
                                            _check_model_name, _default_precision, build_student, build_teacher,
                                            freeze, get_tokenizer, import_open_clip, list_model_names, load_clip,
                                            shipped_model_names)

__all__ = ["CHECKPOINT_SUFFIXES", "CONFIG_DIR", "TINY_STUDENT", "TINY_TEACHER", "Teacher", "build_student",
           "build_teacher", "freeze", "get_tokenizer", "import_open_clip", "list_model_names", "load_clip",
           "shipped_model_names", "_check_model_name", "_default_precision"]
