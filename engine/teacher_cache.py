"""The old path ``clipdistill.engine.teacher_cache``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.commands.cache_teacher``, ``clipdistill.engine.training.teacher_cache`` instead.
The module was: Teacher cache: run the teacher once per image and view, replay it in every epoch after.
"""
from clipdistill.engine.commands.cache_teacher import register
from clipdistill.engine.training.teacher_cache import (ARRAYS, FORMAT, CachedTeacher, CacheKey, TeacherCache,
                                                       TeacherCacheError, build_teacher_cache, run_key)

__all__ = ["ARRAYS", "CacheKey", "CachedTeacher", "FORMAT", "TeacherCache", "TeacherCacheError",
           "build_teacher_cache", "register", "run_key"]
